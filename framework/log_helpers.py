"""Logging helpers nameko users import (``nameko.log_helpers``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any


def make_timing_logger(
    logger: logging.Logger, precision: int = 3, level: int = logging.DEBUG
) -> Callable[..., AbstractContextManager[None]]:
    """A context manager factory that logs how long its block took.

        log_time = make_timing_logger(log, level=logging.INFO, precision=2)
        with log_time("loaded %s", name):
            load(name)          # logs "loaded <name> in 0.42s"

    The line is logged when the block exits, whether or not it raised; the
    message and its arguments are formatted lazily by logging, as usual.
    """
    suffix = f" in %0.{int(precision)}fs"

    @contextmanager
    def log_time(msg: str, *args: Any) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            logger.log(level, msg + suffix, *args, time.perf_counter() - started)

    return log_time
