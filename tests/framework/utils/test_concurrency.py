"""``framework.utils.concurrency.fail_fast_imap``."""

from __future__ import annotations

import pytest

from framework import concurrency
from framework.utils.concurrency import fail_fast_imap


def test_results_in_completion_order() -> None:
    def call(delay: float) -> float:
        concurrency.sleep(delay)
        return delay

    pool = concurrency.GreenPool()
    assert list(fail_fast_imap(pool, call, [0.05, 0, 0.02])) == [0, 0.02, 0.05]


def test_first_error_kills_the_others() -> None:
    finished: list[str] = []
    never = concurrency.Event()

    def call(item: str) -> str:
        if item == "bad":
            raise ValueError(item)
        never.wait()  # only a kill ends it
        finished.append(item)
        return item

    pool = concurrency.GreenPool()
    with concurrency.Timeout(5), pytest.raises(ValueError):
        list(fail_fast_imap(pool, call, ["slow", "bad", "slow2"]))
    with concurrency.Timeout(5):
        pool.waitall()
    assert finished == []
