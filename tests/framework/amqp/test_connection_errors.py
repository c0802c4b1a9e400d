"""Which errors mean a lost connection (reconnect) and which a bug (no broker)."""

from __future__ import annotations

import amqp.exceptions
import kombu

from framework.amqp.connection import is_connection_error


def test_connection_errors_are_lost_connections_whatever_the_connection():
    for exc in (
        ConnectionResetError(),
        EOFError(),
        amqp.exceptions.UnexpectedFrame("x"),
        amqp.exceptions.RecoverableConnectionError("x"),
    ):
        assert is_connection_error(exc, None)


def test_an_attribute_error_is_a_bug_on_a_live_connection():
    with kombu.Connection("memory://") as connection:
        connection.connect()
        assert connection.connected
        assert not is_connection_error(AttributeError("no such thing"), connection)
    # py-amqp's transport torn down underneath it: the same error means "lost".
    assert not connection.connected
    assert is_connection_error(AttributeError("'NoneType' object..."), connection)
    assert is_connection_error(AttributeError("x"), None)


def test_other_errors_are_never_lost_connections():
    with kombu.Connection("memory://") as connection:
        connection.connect()
        for exc in (ValueError(), TypeError(), RecursionError(), KeyError("k")):
            assert not is_connection_error(exc, connection)
        connection.close()
        assert not is_connection_error(ValueError(), connection)
