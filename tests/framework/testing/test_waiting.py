from __future__ import annotations

import sys

import pytest

from framework import concurrency
from framework.testing.waiting import WaitResult, wait_for_call


class Greeter:
    def __init__(self) -> None:
        self.calls = 0

    def greet(self, name: str) -> str:
        self.calls += 1
        return f"hello {name} #{self.calls}"

    def fail(self) -> None:
        raise KeyError("boom")


def test_wait_result_keeps_the_first_outcome_sent():
    result = WaitResult()
    result.send("first", None)
    result.send("second", None)
    assert result.get() == "first"
    assert result.get() == "first"


def test_wait_result_get_before_any_outcome_raises_not_ready():
    result = WaitResult()
    assert result.has_result is False
    with pytest.raises(WaitResult.NotReady):
        result.get()


def test_wait_result_of_none_counts_as_a_result():
    result = WaitResult()
    result.send(None, None)
    assert result.has_result is True
    assert result.get() is None


def test_wait_result_reraises_the_exception_it_was_sent():
    try:
        raise ValueError("bad value")
    except ValueError:
        exc_info = sys.exc_info()
    result = WaitResult()
    result.send(None, exc_info)
    with pytest.raises(ValueError, match="bad value"):
        result.get()


def test_wait_for_call_waits_until_a_call_made_in_another_thread_returns():
    greeter = Greeter()
    with concurrency.Timeout(5):
        with wait_for_call(greeter, "greet") as result:
            concurrency.spawn_after(0.01, greeter.greet, "ann")
    assert result.get() == "hello ann #1"


def test_wait_for_call_leaves_the_call_result_untouched_and_unpatches_on_exit():
    greeter = Greeter()
    with wait_for_call(greeter, "greet"):
        assert greeter.greet("bob") == "hello bob #1"
    assert "greet" not in vars(greeter)


def test_wait_for_call_completes_on_the_first_call_the_callback_accepts():
    greeter = Greeter()
    seen = []

    def third_call(args, kwargs, result, exc_info):
        seen.append((args, kwargs, result, exc_info))
        return result.endswith("#3")

    def greet_repeatedly():
        for _ in range(5):
            greeter.greet(name="cy")
            concurrency.sleep(0)

    with concurrency.Timeout(5):
        with wait_for_call(greeter, "greet", callback=third_call) as result:
            concurrency.spawn(greet_repeatedly)

    assert result.get() == "hello cy #3"
    assert seen[0] == ((), {"name": "cy"}, "hello cy #1", None)
    assert len(seen) == 3


def test_wait_for_call_reports_the_exception_of_the_awaited_call():
    greeter = Greeter()
    with wait_for_call(greeter, "fail") as result:
        with pytest.raises(KeyError):
            greeter.fail()
    with pytest.raises(KeyError, match="boom"):
        result.get()


def test_wait_for_call_can_wait_until_a_call_stops_raising():
    attempts = []

    class Flaky:
        def connect(self) -> str:
            attempts.append(1)
            if len(attempts) < 3:
                raise ConnectionError("not yet")
            return "connected"

    flaky = Flaky()

    def retry_until_connected():
        while True:
            try:
                flaky.connect()
                return
            except ConnectionError:
                concurrency.sleep(0)

    with concurrency.Timeout(5):
        with wait_for_call(
            flaky,
            "connect",
            callback=lambda args, kwargs, res, exc_info: exc_info is None,
        ) as result:
            concurrency.spawn(retry_until_connected)

    assert result.get() == "connected"
    assert len(attempts) == 3


def test_wait_for_call_on_a_class_sees_calls_on_every_instance():
    with wait_for_call(Greeter, "greet") as result:
        Greeter().greet("dee")
    assert result.get() == "hello dee #1"
    assert "greet" in vars(Greeter)  # the original method is back
    assert Greeter.greet.__name__ == "greet"


def test_wait_for_call_raises_a_failing_callback_error_in_the_waiting_test():
    greeter = Greeter()

    def broken_callback(args, kwargs, result, exc_info):
        raise RuntimeError("callback bug")

    with pytest.raises(RuntimeError, match="callback bug"):
        with wait_for_call(greeter, "greet", callback=broken_callback):
            assert greeter.greet("eve") == "hello eve #1"
