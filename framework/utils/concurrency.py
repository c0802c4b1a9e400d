"""Helpers running calls on green threads."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from framework import concurrency


def fail_fast_imap(
    pool: Any, call: Callable[[Any], Any], items: Iterable[Any]
) -> Iterator[Any]:
    """Yield ``call(item)`` for each item, run on ``pool``, in completion order.

    When one call raises, the calls still running are killed and the error is
    raised to the caller straight away, rather than after every call finished
    (as ``GreenPool.imap`` would). ``pool`` is anything with ``spawn`` returning
    a green thread (an eventlet ``GreenPool``).
    """
    items = list(items)
    results: Any = concurrency.Queue()
    running = set()

    def collect(thread: Any) -> None:
        running.discard(thread)
        try:
            results.put((True, thread.wait()))
        except BaseException as error:  # noqa: BLE001 - handed to the caller
            results.put((False, error))

    for item in items:
        thread = pool.spawn(call, item)
        running.add(thread)
        thread.link(collect)
    for _ in items:
        ok, value = results.get()
        if not ok:
            for thread in list(running):
                thread.kill()
            raise value
        yield value
