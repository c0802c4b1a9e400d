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
from framework.settings import ProductionSecrets
from framework.storage import Storage
from services.web.dependencies import (
    DEVELOPMENT_SECRET_KEY,
    SECRET_KEY_CONFIG_KEY,
    EdgeStore,
    Routes,
)
from services.web.http import SESSION_CONTEXT_KEY, EdgeHub
from services.web.routes.auth import AuthRoutes
from services.web.routes.conversions import ConversionRoutes
from services.web.routes.dashboard import DashboardRoutes
from services.web.routes.docs import DocsRoutes
from services.web.routes.live import LiveRoutes
from services.web.routes.schedules import ScheduleRoutes
from services.web.routes.system import SystemRoutes
from services.web.routes.users import UserRoutes

# The edge waits this long for another service before answering 503: a page
# must not hang because a service is down.
RPC_TIMEOUT = 15.0


class SessionHandle(ContextDataProvider):
    """The websocket's login session (its public id), from the socket's context."""

    context_key = SESSION_CONTEXT_KEY


class WebService(
    AuthRoutes,
    DashboardRoutes,
    ConversionRoutes,
    UserRoutes,
    ScheduleRoutes,
    SystemRoutes,
    DocsRoutes,
    LiveRoutes,
):
    name = "web"

    secrets = ProductionSecrets({SECRET_KEY_CONFIG_KEY: DEVELOPMENT_SECRET_KEY})
    store: Any = EdgeStore()
    users: Any = RpcProxy("users", timeout=RPC_TIMEOUT)
    conversions: Any = RpcProxy("conversions", timeout=RPC_TIMEOUT)
    scheduler: Any = RpcProxy("scheduler", timeout=RPC_TIMEOUT)
    storage: Any = Storage()
    hub: Any = EdgeHub()
    routes: Any = Routes()
    session_id: Any = SessionHandle()
