"""The management API client, against the real broker (each test in its own vhost)."""

from __future__ import annotations

import uuid

import pytest
import requests

from framework.testing.rabbit import Client, HTTPError, ManagementApiUnavailable
from framework.testing.utils import find_free_port

pytestmark = pytest.mark.integration


def test_client_without_a_management_api_says_what_to_enable():
    with pytest.raises(ManagementApiUnavailable) as exc_info:
        Client(f"http://guest:guest@127.0.0.1:{find_free_port()}")
    message = str(exc_info.value)
    assert "Connection error" in message
    assert "rabbitmq-plugins enable rabbitmq_management" in message


def test_client_with_wrong_credentials_fails_with_401(request):
    api_uri = request.config.getoption("RABBIT_API_URI")
    scheme, _, rest = api_uri.partition("://")
    host = rest.rpartition("@")[2]
    with pytest.raises(requests.HTTPError) as exc_info:
        Client(f"{scheme}://nobody:wrong@{host}")
    assert exc_info.value.response.status_code == 401


def test_default_vhost_is_addressable(rabbit_manager):
    assert rabbit_manager.get_vhost("/")["name"] == "/"
    assert "/" in [vhost["name"] for vhost in rabbit_manager.get_all_vhosts()]


def test_vhost_lifecycle_with_permissions(rabbit_manager, rabbit_config):
    vhost = f"framework_client_test_{uuid.uuid4().hex}"
    username = rabbit_config["username"]
    rabbit_manager.create_vhost(vhost)
    try:
        assert vhost in [v["name"] for v in rabbit_manager.get_all_vhosts()]
        rabbit_manager.set_vhost_permissions(vhost, username, ".*", "", "^amq\\.")
        (permission,) = rabbit_manager.get_vhost_permissions(vhost)
        assert (permission["user"], permission["configure"], permission["read"]) == (
            username,
            ".*",
            "",
        )
        assert permission["write"] == "^amq\\."
    finally:
        rabbit_manager.delete_vhost(vhost)

    with pytest.raises(HTTPError) as exc_info:
        rabbit_manager.get_vhost(vhost)
    assert exc_info.value.response.status_code == 404


def test_exchange_queue_binding_publish_and_get(rabbit_manager, rabbit_config):
    vhost = rabbit_config["vhost"]
    rabbit_manager.create_exchange(vhost, "orders.events", type="topic", durable=False)
    rabbit_manager.create_queue(vhost, "billing", durable=False)
    rabbit_manager.create_queue_binding(vhost, "orders.events", "billing", "order.*")

    assert rabbit_manager.get_exchange(vhost, "orders.events")["type"] == "topic"
    assert "orders.events" in [e["name"] for e in rabbit_manager.get_exchanges(vhost)]
    assert rabbit_manager.get_queue(vhost, "billing")["durable"] is False
    assert [q["name"] for q in rabbit_manager.get_queues(vhost)] == ["billing"]
    routing_keys = [
        b["routing_key"] for b in rabbit_manager.get_queue_bindings(vhost, "billing")
    ]
    assert "order.*" in routing_keys  # next to the default exchange's binding
    assert any(
        b["source"] == "orders.events" for b in rabbit_manager.get_bindings(vhost)
    )

    routed = rabbit_manager.publish(vhost, "orders.events", "order.created", {"id": 7})
    assert routed == {"routed": True}
    unrouted = rabbit_manager.publish(vhost, "orders.events", "invoice.sent", "ignored")
    assert unrouted == {"routed": False}

    (peeked,) = rabbit_manager.get_messages(vhost, "billing", requeue=True)
    (taken,) = rabbit_manager.get_messages(vhost, "billing")
    for message in (peeked, taken):
        assert message["payload"] == '{"id": 7}'
        assert message["routing_key"] == "order.created"
        assert message["properties"]["content_type"] == "application/json"
    assert rabbit_manager.get_messages(vhost, "billing") == []


def test_publish_to_the_default_exchange_routes_by_queue_name(
    rabbit_manager, rabbit_config
):
    vhost = rabbit_config["vhost"]
    rabbit_manager.create_queue(vhost, "direct", durable=False)
    assert rabbit_manager.publish(vhost, "", "direct", "plain text") == {"routed": True}
    (message,) = rabbit_manager.get_messages(vhost, "direct")
    assert message["payload"] == "plain text"


def test_deleted_queue_and_exchange_are_gone(rabbit_manager, rabbit_config):
    vhost = rabbit_config["vhost"]
    rabbit_manager.create_exchange(vhost, "temporary")
    rabbit_manager.create_queue(vhost, "temporary")
    rabbit_manager.delete_queue(vhost, "temporary")
    rabbit_manager.delete_exchange(vhost, "temporary")

    for lookup in (rabbit_manager.get_queue, rabbit_manager.get_exchange):
        with pytest.raises(HTTPError) as exc_info:
            lookup(vhost, "temporary")
        assert exc_info.value.response.status_code == 404
