"""The web service: the admin panel and the JSON API.

A thin edge: routes parse, authorize and call the other services over RPC; pages
are Jinja2 templates, live updates come from the other services' events through
the websocket hub. It owns only edge state (sessions, tokens, login throttling).
The routes live in ``routes/``, one module per area, mixed in here.
"""

from __future__ import annotations

from typing import Any

from framework.contextdata import ContextDataProvider
from framework.rpc import RpcProxy
from framework.settings import DEVELOPMENT_DATABASE_SECRET, ProductionSecrets
from framework.storage import Storage
from services.web.dependencies import (
    DEVELOPMENT_SECRET_KEY,
    SECRET_KEY_CONFIG_KEY,
    EdgeStore,
    Routes,
)
from services.web.http import SESSION_CONTEXT_KEY, EdgeHub

# Modules, not their classes: `framework run services.web.service` runs every class
# with entrypoints found in this module's namespace, and the mixins have some.
from services.web.routes import (
    auth,
    conversions,
    dashboard,
    docs,
    live,
    schedules,
    system,
    users,
)

# The edge waits this long for another service before answering 503: a page
# must not hang because a service is down.
RPC_TIMEOUT = 15.0


class SessionHandle(ContextDataProvider):
    """The websocket's login session (its public id), from the socket's context."""

    context_key = SESSION_CONTEXT_KEY


class WebService(
    auth.AuthRoutes,
    dashboard.DashboardRoutes,
    conversions.ConversionRoutes,
    users.UserRoutes,
    schedules.ScheduleRoutes,
    system.SystemRoutes,
    docs.DocsRoutes,
    live.LiveRoutes,
):
    name = "web"

    secrets = ProductionSecrets(
        {SECRET_KEY_CONFIG_KEY: DEVELOPMENT_SECRET_KEY, **DEVELOPMENT_DATABASE_SECRET}
    )
    store: Any = EdgeStore()
    users: Any = RpcProxy("users", timeout=RPC_TIMEOUT)
    conversions: Any = RpcProxy("conversions", timeout=RPC_TIMEOUT)
    scheduler: Any = RpcProxy("scheduler", timeout=RPC_TIMEOUT)
    storage: Any = Storage()
    hub: Any = EdgeHub()
    routes: Any = Routes()
    session_id: Any = SessionHandle()
