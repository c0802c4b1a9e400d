"""Dead-letter listings mask the entrypoint's ``sensitive_arguments``."""

from __future__ import annotations

import json
import subprocess
import sys

import kombu

from framework import deadletters
from framework.deadletters import DeadLetter, display_body
from framework.events import event_handler
from framework.rpc import rpc
from framework.standalone.events import event_dispatcher
from framework.standalone.rpc import ClusterRpcProxy
from tests.helpers import wait_for

SECRET = "hunter2-secret"


def letter(body: bytes, spec: dict | None) -> DeadLetter:
    headers = {"x-sensitive-arguments": spec} if spec else {}
    return DeadLetter(body, "application/json", "why", "ex", "rk", headers)


def test_rpc_arguments_are_masked_by_name_positional_or_keyword():
    spec = {
        "paths": ["password", "profile.pin", "tokens[1]"],
        "parameters": ["email", "password", "profile", "tokens"],
        "layout": "rpc",
    }
    body = {
        "args": ["ann@example.com", SECRET],
        "kwargs": {"profile": {"pin": "1234", "age": 3}, "tokens": ["a", "b"]},
    }
    shown = json.loads(display_body(letter(json.dumps(body).encode(), spec)))
    assert shown == {
        "email": "ann@example.com",
        "password": "********",
        "profile": {"pin": "********", "age": 3},
        "tokens": ["a", "********"],
    }


def test_a_body_that_cannot_be_masked_is_withheld():
    spec = {"paths": ["password"], "parameters": ["password"], "layout": "rpc"}
    for body in (b'{"args": ["' + SECRET.encode(), b'["' + SECRET.encode() + b'"]'):
        shown = display_body(letter(body, spec))
        assert SECRET not in shown and "withheld" in shown


def test_without_sensitive_arguments_the_body_is_shown_as_is():
    assert display_body(letter(b'{"a": 1}', None)) == '{"a": 1}'


class Signup:
    name = "signup"

    @event_handler(
        "web",
        "signed_up",
        requeue_on_error=True,
        sensitive_arguments=("payload.password",),
    )
    def on_signup(self, payload):
        raise RuntimeError("always fails")

    @rpc(sensitive_arguments=("password",))
    def create(self, email, password):
        return email


def test_dead_letters_listing_masks_sensitive_arguments(rabbit_config, runner_factory):
    config = {**rabbit_config, "MAX_REDELIVERIES": 0}
    runner_factory(config, Signup).start()
    dispatch = event_dispatcher(rabbit_config)
    dispatch("web", "signed_up", {"email": "ann@example.com", "password": SECRET})
    dispatch.close()
    # An undecodable RPC request to a method with sensitive arguments.
    with ClusterRpcProxy(rabbit_config, timeout=5) as cluster:
        assert cluster.signup.create("bob@example.com", "pw") == "bob@example.com"
    with kombu.Connection(rabbit_config["AMQP_URI"]) as connection:
        connection.Producer().publish(
            b'{"args": ["bob@example.com", "' + SECRET.encode(),
            exchange="nameko-rpc",
            routing_key="signup.create",
            content_type="application/json",
            content_encoding="utf-8",
        )
    event_queue = "evt-web-signed_up--signup.on_signup"
    wait_for(lambda: len(deadletters.peek(rabbit_config, event_queue)) == 1)
    wait_for(lambda: len(deadletters.peek(rabbit_config, "rpc-signup")) == 1)
    for queue_name, visible in (
        (event_queue, '{"email": "ann@example.com", "password": "********"}'),
        ("rpc-signup", "withheld"),
    ):
        listing = subprocess.run(
            [
                sys.executable,
                "-m",
                "framework.cli.main",
                "dead-letters",
                "list",
                queue_name,
                "--broker",
                rabbit_config["AMQP_URI"],
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert listing.returncode == 0, listing.stderr
        assert visible in listing.stdout
        assert SECRET not in listing.stdout and "1 dead letter(s)" in listing.stdout
