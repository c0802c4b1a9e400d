"""The scheduler's entrypoints: the tick loop (``ticker``, the framework's
``@paced`` loop) and the method that calls one claimed run's target
(``run_target``, started by ``RunLauncher``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from framework.extensions import Entrypoint
from framework.timer import Paced
from services.scheduler.claiming import MAX_WAIT_SECONDS

log = logging.getLogger(__name__)

# After the claim failed (database down), before trying again.
ERROR_WAIT_SECONDS = 1.0


class RunTarget(Entrypoint):
    """Marks the method that calls one claimed run's target (``RunLauncher`` starts it)."""


# Claims due ticks, then waits the seconds the claim returns (at most
# ``MAX_WAIT_SECONDS``, so a schedule created on another replica is seen soon).
ticker: Callable[..., Any] = Paced.decorator(
    max_wait=MAX_WAIT_SECONDS, error_wait=ERROR_WAIT_SECONDS
)
run_target: Callable[..., Any] = RunTarget.decorator
