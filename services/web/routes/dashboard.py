"""The dashboard: counts, recent conversions, next schedules, service health."""

from __future__ import annotations

import logging
from typing import Any

from werkzeug.wrappers import Request, Response

from services.conversions.schemas import JOB_STATES
from services.web.http import MEMBER, render, route
from services.web.routes.system import probe_services

log = logging.getLogger(__name__)

RECENT = 5


class DashboardRoutes:
    store: Any
    users: Any
    conversions: Any
    scheduler: Any

    @route("GET", "/", access=MEMBER)
    def dashboard_page(self, request: Request) -> Response:
        principal = request.principal  # type: ignore[attr-defined]
        owner = None if principal.is_admin else principal.user_id
        counts = {
            state: self.conversions.list_jobs(
                state=state, owner=owner, page=1, per_page=1
            )["total"]
            for state in JOB_STATES
        }
        recent = self.conversions.list_jobs(owner=owner, page=1, per_page=RECENT)[
            "items"
        ]
        schedules: list[dict[str, Any]] = []
        users_total = None
        health: list[dict[str, Any]] = []
        if principal.is_admin:
            users_total = self.users.list_users(page=1, per_page=1)["total"]
            listed = self.scheduler.list_schedules(page=1, per_page=RECENT)["items"]
            schedules = [self.scheduler.get_schedule(item["id"]) for item in listed]
            health = probe_services(self.store.settings.service_health_urls)
        return render(
            request,
            "dashboard.html",
            counts=counts,
            recent=recent,
            schedules=schedules,
            users_total=users_total,
            health=health,
        )
