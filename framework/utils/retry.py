"""Retrying a call that fails with a transient error."""

from __future__ import annotations

import functools
from collections.abc import Callable
from time import sleep
from typing import Any, TypeVar, overload

F = TypeVar("F", bound=Callable[..., Any])


@overload
def retry(wrapped: F) -> F: ...


@overload
def retry(
    wrapped: None = None,
    *,
    for_exceptions: type[BaseException] | tuple[type[BaseException], ...] = ...,
    max_attempts: int | None = ...,
    delay: float = ...,
    backoff: float = ...,
    max_delay: float | None = ...,
) -> Callable[[F], F]: ...


def retry(
    wrapped: Any = None,
    *,
    for_exceptions: type[BaseException] | tuple[type[BaseException], ...] = Exception,
    max_attempts: int | None = 3,
    delay: float = 1,
    backoff: float = 1,
    max_delay: float | None = None,
) -> Any:
    """Call again when the call raises one of ``for_exceptions``.

    Usable bare (``@retry``) or configured (``@retry(max_attempts=5)``), as nameko's.
    ``max_attempts`` counts the retries after the first call (``None``: forever);
    the pause before retry *n* is ``delay * backoff**n`` capped at ``max_delay``.
    The pause is ``time.sleep`` (green once eventlet has patched it), looked up
    as this module's ``sleep`` so tests can patch it.
    """
    if wrapped is None:
        return functools.partial(
            retry,
            for_exceptions=for_exceptions,
            max_attempts=max_attempts,
            delay=delay,
            backoff=backoff,
            max_delay=max_delay,
        )

    @functools.wraps(wrapped)
    def call(*args: Any, **kwargs: Any) -> Any:
        retries = 0
        pause = delay
        while True:
            try:
                return wrapped(*args, **kwargs)
            except for_exceptions:
                if max_attempts is not None and retries >= max_attempts:
                    raise
                retries += 1
                pause = pause * backoff if backoff else pause
                sleep(min(pause, max_delay) if max_delay else pause)

    return call
