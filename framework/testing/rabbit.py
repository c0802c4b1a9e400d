"""A small client for RabbitMQ's management HTTP API, for tests.

Tests use it to make a vhost per test, and to look at what the broker really holds
(queues, bindings, connections, messages) rather than trusting our own code's view.
The API is served by the ``rabbitmq_management`` plugin:
``rabbitmq-plugins enable rabbitmq_management``.
"""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import requests

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0  # seconds per API request; a hung broker fails the test


class ManagementApiUnavailable(Exception):
    """The management API could not be reached (plugin off, wrong port or host)."""


class HTTPError(requests.HTTPError):
    """The management API answered with an error; ``response`` has the details."""


class Client:
    """``Client("http://guest:guest@localhost:15672")``: the management API as methods.

    Raises ``ManagementApiUnavailable`` at construction if the API does not answer.
    Failed calls raise ``HTTPError`` (a ``requests.HTTPError``), whose
    ``response.status_code`` tells e.g. a missing vhost (404) from a refusal (401).
    """

    def __init__(self, api_uri: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        parts = urlsplit(api_uri)
        self.username = unquote(parts.username) if parts.username else None
        netloc = parts.hostname or "localhost"
        if parts.port:
            netloc = f"{netloc}:{parts.port}"
        self._base_url = urlunsplit(
            (parts.scheme, netloc, parts.path.rstrip("/") + "/api", "", "")
        )
        self._timeout = timeout
        self._session = requests.Session()
        self._session.headers["content-type"] = "application/json"
        if parts.username is not None:
            self._session.auth = (
                unquote(parts.username),
                unquote(parts.password or ""),
            )
        self._verify_api_connection()

    def __repr__(self) -> str:
        return f"<rabbit.Client {self._base_url}>"

    # -- plumbing --------------------------------------------------------------------

    def _url(self, segments: tuple[str, ...]) -> str:
        # Every segment is quoted whole: the default vhost "/" must travel as %2F.
        return "/".join(
            [self._base_url, *(quote(segment, safe="") for segment in segments)]
        )

    def _request(self, method: str, *segments: str, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", self._timeout)
        response = self._session.request(method, self._url(segments), **kwargs)
        if response.status_code >= 400:
            try:
                reason = response.json().get("reason", response.text)
            except ValueError:
                reason = response.text
            raise HTTPError(
                f"{response.status_code} on {method} /{'/'.join(segments)}: {reason}",
                response=response,
            )
        if response.content:
            return response.json()
        return None

    def _get(self, *segments: str, **kwargs: Any) -> Any:
        return self._request("GET", *segments, **kwargs)

    def _put(self, *segments: str, **kwargs: Any) -> Any:
        return self._request("PUT", *segments, **kwargs)

    def _post(self, *segments: str, **kwargs: Any) -> Any:
        return self._request("POST", *segments, **kwargs)

    def _delete(self, *segments: str, **kwargs: Any) -> Any:
        return self._request("DELETE", *segments, **kwargs)

    def _verify_api_connection(self) -> None:
        try:
            self._get("overview")
        except requests.ConnectionError as exc:
            raise ManagementApiUnavailable(
                f"Connection error for the RabbitMQ management HTTP API at {self._base_url}: "
                f"{exc}. Is the plugin enabled? (rabbitmq-plugins enable rabbitmq_management)"
            ) from exc

    # -- broker ----------------------------------------------------------------------

    def get_overview(self) -> dict[str, Any]:
        return self._get("overview")

    # -- vhosts and permissions ------------------------------------------------------

    def get_all_vhosts(self) -> list[dict[str, Any]]:
        return self._get("vhosts")

    def get_vhost(self, vhost: str) -> dict[str, Any]:
        return self._get("vhosts", vhost)

    def create_vhost(self, vhost: str) -> None:
        self._put("vhosts", vhost)

    def delete_vhost(self, vhost: str) -> None:
        """Deletes the vhost with everything in it; the broker closes its connections."""
        self._delete("vhosts", vhost)

    def get_vhost_permissions(self, vhost: str) -> list[dict[str, Any]]:
        return self._get("vhosts", vhost, "permissions")

    def set_vhost_permissions(
        self, vhost: str, username: str, configure: str, read: str, write: str
    ) -> None:
        body = {"configure": configure, "read": read, "write": write}
        self._put("permissions", vhost, username, data=json.dumps(body))

    # -- connections -----------------------------------------------------------------

    def get_connections(self) -> list[dict[str, Any]]:
        return self._get("connections")

    def delete_connection(self, name: str) -> None:
        self._delete("connections", name)

    # -- exchanges -------------------------------------------------------------------

    def get_exchanges(self, vhost: str) -> list[dict[str, Any]]:
        return self._get("exchanges", vhost)

    def get_exchange(self, vhost: str, name: str) -> dict[str, Any]:
        return self._get("exchanges", vhost, name)

    def create_exchange(
        self, vhost: str, name: str, type: str = "topic", **properties: Any
    ) -> None:
        body = {"type": type, **properties}
        self._put("exchanges", vhost, name, data=json.dumps(body))

    def delete_exchange(self, vhost: str, name: str) -> None:
        self._delete("exchanges", vhost, name)

    def publish(
        self,
        vhost: str,
        name: str,
        routing_key: str,
        payload: Any,
        properties: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Publish ``payload`` to exchange ``name`` ("" is the default exchange).

        A ``str`` payload goes as it is; anything else is sent as JSON (with
        ``content_type`` ``application/json`` unless ``properties`` says otherwise).
        Returns ``{"routed": bool}``.
        """
        properties = dict(properties or {})
        if not isinstance(payload, str):
            payload = json.dumps(payload)
            properties.setdefault("content_type", "application/json")
        body = {
            "routing_key": routing_key,
            "payload": payload,
            "payload_encoding": "string",
            "properties": properties,
        }
        return self._post(
            "exchanges", vhost, name or "amq.default", "publish", json=body
        )

    # -- queues and bindings ---------------------------------------------------------

    def get_queues(self, vhost: str) -> list[dict[str, Any]]:
        return self._get("queues", vhost)

    def get_queue(self, vhost: str, name: str) -> dict[str, Any]:
        return self._get("queues", vhost, name)

    def create_queue(self, vhost: str, name: str, **properties: Any) -> None:
        self._put("queues", vhost, name, data=json.dumps(properties))

    def delete_queue(self, vhost: str, name: str) -> None:
        self._delete("queues", vhost, name)

    def get_queue_bindings(self, vhost: str, name: str) -> list[dict[str, Any]]:
        return self._get("queues", vhost, name, "bindings")

    def get_bindings(self, vhost: str) -> list[dict[str, Any]]:
        return self._get("bindings", vhost)

    def create_queue_binding(
        self,
        vhost: str,
        exchange: str,
        queue: str,
        routing_key: str,
        arguments: dict[str, Any] | None = None,
    ) -> None:
        body = {"routing_key": routing_key, "arguments": arguments or {}}
        self._post("bindings", vhost, "e", exchange, "q", queue, json=body)

    def get_messages(
        self, vhost: str, name: str, count: int = 1, requeue: bool = False
    ) -> list[dict[str, Any]]:
        """Take up to ``count`` messages off the queue (put back if ``requeue``).

        Each message is a dict with ``payload`` (decoded to text where possible),
        ``properties``, ``routing_key``, ``exchange``, ``redelivered``.
        """
        body = {
            "count": count,
            # RabbitMQ >= 3.7 reads ``ackmode``; older versions read ``requeue``.
            "ackmode": "ack_requeue_true" if requeue else "ack_requeue_false",
            "requeue": requeue,
            "encoding": "auto",
        }
        return self._post("queues", vhost, name, "get", json=body)
