"""Live updates: websocket subscriptions and the events pushed through them.

Channels, and who may subscribe (checked here, on subscribe, not only by which
page offers the button):

* ``jobs``: every job's events for an admin, one's own jobs for a member;
* ``job:<id>``: one job's events, for its owner or an admin;
* ``schedules`` and ``schedule:<id>``: schedule runs, for admins.

Conversion and scheduler events reach every replica of the web service (a
BROADCAST handler each, so each replica pushes to its own sockets); the users
service's events update the sessions and tokens once (a service-pool handler).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from framework.events import BROADCAST, event_handler
from services.conversions.exceptions import JobNotFound
from services.conversions.schemas import CONVERSION_EVENTS
from services.scheduler.schemas import SCHEDULE_RUN_FINISHED, SCHEDULE_RUN_STARTED
from services.users.schemas import USER_DELETED, USER_UPDATED
from services.web.exceptions import Forbidden, NotAuthenticated, NotFound
from services.web.http import socket_rpc

log = logging.getLogger(__name__)

_CHANNEL = re.compile(r"^(jobs|schedules|job:[0-9A-Za-z-]{1,64}|schedule:[0-9]{1,10})$")


def on_events(source: str, event_types: tuple[str, ...], **options: Any) -> Any:
    """One event handler per type on the same method (a handler takes one type)."""

    def register(fn: Any) -> Any:
        for event_type in event_types:
            fn = event_handler(source, event_type, **options)(fn)
        return fn

    return register


def job_channels(job: dict[str, Any]) -> list[str]:
    channels = ["jobs.all", f"job.{job['id']}"]
    if job.get("owner") is not None:
        channels.append(f"jobs.user.{job['owner']}")
    return channels


class LiveRoutes:
    store: Any
    hub: Any
    conversions: Any
    session_id: Any

    @socket_rpc
    def subscribe(self, socket_id: str, channel: str) -> str:
        """Subscribe this socket to ``channel`` if its user may see it; returns the
        internal channel joined."""
        principal = self.store.session_principal_by_id(self.session_id)
        if principal is None:
            raise NotAuthenticated("the session has ended; log in again")
        if not isinstance(channel, str) or not _CHANNEL.match(channel):
            raise NotFound("no such channel")
        if channel == "jobs":
            joined = (
                "jobs.all" if principal.is_admin else f"jobs.user.{principal.user_id}"
            )
        elif channel.startswith("job:"):
            try:
                job = self.conversions.get_job(channel[4:])
            except JobNotFound:
                # The same answer as for someone else's job: ids cannot be probed.
                raise NotFound("no such channel") from None
            if not principal.is_admin and job["owner"] != principal.user_id:
                raise NotFound("no such channel")
            joined = f"job.{job['id']}"
        else:
            if not principal.is_admin:
                raise Forbidden("this needs an administrator")
            joined = (
                "schedules.all" if channel == "schedules" else f"schedule.{channel[9:]}"
            )
        self.hub.subscribe(socket_id, joined)
        return joined

    # reliable_delivery=False: a replica's queue goes away with it, as its sockets did.
    @on_events(
        "conversions",
        CONVERSION_EVENTS,
        handler_type=BROADCAST,
        reliable_delivery=False,
    )
    def push_conversion_event(self, payload: dict[str, Any]) -> None:
        job = payload["job"]
        for channel in job_channels(job):
            self.hub.broadcast(channel, "job", job)

    @on_events(
        "scheduler",
        (SCHEDULE_RUN_STARTED, SCHEDULE_RUN_FINISHED),
        handler_type=BROADCAST,
        reliable_delivery=False,
    )
    def push_schedule_event(self, payload: dict[str, Any]) -> None:
        run = payload["run"]
        for channel in ("schedules.all", f"schedule.{run['schedule_id']}"):
            self.hub.broadcast(
                channel, "run", {"schedule": payload["schedule"], "run": run}
            )

    @on_events(
        "users",
        (USER_UPDATED, USER_DELETED),
        handler_type=BROADCAST,
        reliable_delivery=False,
    )
    def close_changed_users_sockets(self, payload: dict[str, Any]) -> None:
        """A user whose rights changed (role, deactivation, password, deletion)
        loses this replica's open sockets: subscriptions were authorized with the
        old rights. Their pages reconnect and are authorized afresh (or refused)."""
        changed = set(payload.get("changed") or ("deleted",))
        if changed & {"role", "is_active", "password", "deleted"}:
            # Every replica hears this: its cached credentials of the user go
            # too, usually well before their bound (CREDENTIAL_CACHE_SECONDS).
            self.store.credentials.forget_user(payload["user"]["id"])
            self.hub.close_sockets(user_id=payload["user"]["id"])

    @event_handler("users", USER_UPDATED)
    def on_user_updated(self, payload: dict[str, Any]) -> None:
        user = payload["user"]
        changed = set(payload.get("changed") or ())
        self.store.user_changed(user)
        if not user["is_active"]:
            self.store.revoke_user_sessions(user["id"])
            self.store.revoke_user_tokens(user["id"])
        elif "password" in changed:
            # A new password ends every session opened with the old one; an
            # admin's reset also ends the API tokens, since it usually means
            # the old password (and so whatever was opened with it) is not
            # to be trusted.
            self.store.revoke_user_sessions(user["id"])
            if payload.get("reset"):
                self.store.revoke_user_tokens(user["id"])

    @event_handler("users", USER_DELETED)
    def on_user_deleted(self, payload: dict[str, Any]) -> None:
        self.store.forget_user(payload["user"]["id"])
