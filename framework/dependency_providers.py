"""Built-in dependency providers."""

from __future__ import annotations

from typing import Any

from framework.containers import WorkerContext
from framework.extensions import DependencyProvider


class Config(DependencyProvider):
    """Injects a shallow copy of the container's config."""

    def get_dependency(self, worker_ctx: WorkerContext) -> dict[str, Any]:
        return dict(self.container.config)
