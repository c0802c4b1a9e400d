"""Dependency providers that expose one context-data key to the worker."""

from __future__ import annotations

from typing import Any

from framework.constants import (
    AUTH_TOKEN_CONTEXT_KEY,
    LANGUAGE_CONTEXT_KEY,
    USER_AGENT_CONTEXT_KEY,
    USER_ID_CONTEXT_KEY,
)
from framework.containers import WorkerContext
from framework.extensions import DependencyProvider


class ContextDataProvider(DependencyProvider):
    context_key: str

    def get_dependency(self, worker_ctx: WorkerContext) -> Any:
        return worker_ctx.data.get(self.context_key)


class Language(ContextDataProvider):
    context_key = LANGUAGE_CONTEXT_KEY


class UserId(ContextDataProvider):
    context_key = USER_ID_CONTEXT_KEY


class UserAgent(ContextDataProvider):
    context_key = USER_AGENT_CONTEXT_KEY


class AuthToken(ContextDataProvider):
    context_key = AUTH_TOKEN_CONTEXT_KEY
