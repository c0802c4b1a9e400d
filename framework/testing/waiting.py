"""Wait, in a test, until some method has been called (and returned)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from unittest.mock import patch

from framework import concurrency

log = logging.getLogger(__name__)

ExcInfo = tuple[type[BaseException], BaseException, Any]
CallPredicate = Callable[[tuple[Any, ...], dict[str, Any], Any, "ExcInfo | None"], bool]

_UNSET: Any = object()


class WaitResult:
    """The outcome of the call a waiter waited for: a value or an exception.

    Only the first outcome sent is kept; later ones are ignored, so a waiter
    reports the call that satisfied it even if more calls follow.
    """

    class NotReady(Exception):
        """``get()`` was called before the awaited call happened."""

    def __init__(self) -> None:
        self._value: Any = _UNSET
        self._exc_info: ExcInfo | None = None

    @property
    def has_result(self) -> bool:
        return self._value is not _UNSET or self._exc_info is not None

    def send(self, value: Any, exc_info: ExcInfo | None) -> None:
        if self.has_result:
            return
        if exc_info is not None:
            self._exc_info = exc_info
        else:
            self._value = value

    def get(self) -> Any:
        """The call's return value, or its exception raised again."""
        if not self.has_result:
            raise self.NotReady("the awaited call has not happened yet")
        if self._exc_info is not None:
            raise self._exc_info[1].with_traceback(self._exc_info[2])
        return self._value


@contextmanager
def wait_for_call(
    obj: Any, attr: str, callback: CallPredicate | None = None
) -> Iterator[WaitResult]:
    """Watch ``obj.<attr>`` while the block runs; on exit, wait until it was called.

    Without ``callback`` the first call completes the wait. With one, each call's
    ``callback(args, kwargs, result, exc_info)`` decides: the wait completes on the
    first call for which it returns true. The call itself is not disturbed: its
    result is returned and its exception raised as usual. ``obj`` may be an
    instance or a class (then ``args`` starts with the instance).

    There is no timeout here; wrap the block in ``concurrency.Timeout`` (or use
    ``entrypoint_waiter``, which has one).
    """
    result = WaitResult()
    done = concurrency.Event()
    callback_errors: list[BaseException] = []
    original = getattr(obj, attr)

    def record(
        args: tuple[Any, ...], kwargs: dict[str, Any], value: Any, exc_info: Any
    ) -> None:
        if done.ready():
            return
        try:
            satisfied = callback is None or callback(args, kwargs, value, exc_info)
        except Exception as exc:
            # Raised in whatever thread made the call; reported to the waiter instead,
            # where the test will see it.
            callback_errors.append(exc)
            done.send()
            return
        if satisfied:
            result.send(value, exc_info)
            done.send()

    def watched(*args: Any, **kwargs: Any) -> Any:
        try:
            value = original(*args, **kwargs)
        except Exception:
            record(args, kwargs, None, sys.exc_info())
            raise
        record(args, kwargs, value, None)
        return value

    with patch.object(obj, attr, new=watched):
        yield result
        done.wait()
    if callback_errors:
        raise callback_errors[0]
