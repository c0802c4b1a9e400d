"""The system page (admins only): each service's readiness, the broker's queues
and their consumers, and dead letters, with replay."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import requests
from werkzeug.wrappers import Request, Response

from framework import deadletters
from framework.constants import AMQP_URI_CONFIG_KEY
from services.web.exceptions import BadRequest
from services.web.http import ADMIN, json_response, redirect, render, route
from services.web.schemas import SystemStatus

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 3.0  # seconds; the page must render even when a probe hangs
DEAD_LETTER_SUFFIX = deadletters.DEAD_LETTER_SUFFIX


def vhost_of(amqp_uri: str) -> str:
    path = urlsplit(amqp_uri).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def probe_services(urls: dict[str, str]) -> list[dict[str, Any]]:
    found = []
    for name, url in sorted(urls.items()):
        try:
            response = requests.get(url, timeout=PROBE_TIMEOUT)
            ready = response.status_code == 200
            detail = "ready" if ready else f"not ready (HTTP {response.status_code})"
        except requests.RequestException as exc:
            ready, detail = False, f"no answer ({type(exc).__name__})"
        found.append({"name": name, "ready": ready, "detail": detail})
    return found


def probe_broker(
    management_url: str, vhost: str
) -> tuple[list[dict], list[dict], str | None]:
    """``(queues, dead letters, error)`` from RabbitMQ's management API."""
    parts = urlsplit(management_url)
    auth = (unquote(parts.username or "guest"), unquote(parts.password or "guest"))
    base = f"{parts.scheme}://{parts.hostname}:{parts.port or 15672}{parts.path.rstrip('/')}"
    try:
        response = requests.get(
            f"{base}/api/queues/{quote(vhost, safe='')}",
            auth=auth,
            timeout=PROBE_TIMEOUT,
            params={"columns": "name,messages,consumers"},
        )
        response.raise_for_status()
        listed = response.json()
    except (requests.RequestException, ValueError) as exc:
        return (
            [],
            [],
            f"the broker's management API did not answer ({type(exc).__name__})",
        )
    queues, dead = [], []
    for queue in sorted(listed, key=lambda q: q.get("name", "")):
        entry = {
            "name": queue.get("name", ""),
            "messages": int(queue.get("messages") or 0),
            "consumers": int(queue.get("consumers") or 0),
        }
        if entry["name"].endswith(DEAD_LETTER_SUFFIX):
            dead.append(
                {
                    "queue": entry["name"][: -len(DEAD_LETTER_SUFFIX)],
                    "messages": entry["messages"],
                }
            )
        else:
            queues.append(entry)
    return queues, dead, None


class SystemRoutes:
    store: Any

    def _status(self) -> dict[str, Any]:
        settings = self.store.settings
        config = settings.config
        queues, dead, error = probe_broker(
            settings.rabbit_management_url,
            vhost_of(str(config.get(AMQP_URI_CONFIG_KEY, ""))),
        )
        return {
            "services": probe_services(settings.service_health_urls),
            "queues": queues,
            "dead_letters": dead,
            "broker_error": error,
        }

    @route("GET", "/system", access=ADMIN)
    def system_page(self, request: Request) -> Response:
        return render(
            request,
            "system.html",
            status=200,
            system=self._status(),
            replayed=request.args.get("replayed"),
        )

    @route("POST", "/system/dead-letters/replay", access=ADMIN)
    def replay_page(self, request: Request) -> Response:
        queue = request.form.get("queue", "")
        known = {entry["queue"] for entry in self._status()["dead_letters"]}
        if queue not in known:
            raise BadRequest("no dead letters for that queue", {"queue": "unknown"})
        count = deadletters.replay(self.store.settings.config, queue)
        log.info("dead letters replayed", extra={"queue": queue, "count": count})
        return redirect(f"/system?replayed={count}")

    @route(
        "GET",
        "/api/v1/system",
        access=ADMIN,
        summary="Readiness of each service, queues, dead letters",
        response=SystemStatus,
        tag="system",
    )
    def api_system(self, request: Request) -> Response:
        return json_response(self._status())
