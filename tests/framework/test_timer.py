"""@timer: schedule, no overlap, errors, stop (no broker needed)."""

from __future__ import annotations

import time

from framework import concurrency
from framework.timer import paced, timer
from tests.helpers import wait_for

ticks: list[float] = []


def make_service(
    interval: float, eager: bool = False, duration: float = 0.0, fail: bool = False
):
    class Ticker:
        name = "ticker"
        running = 0
        overlap = False

        @timer(interval, eager=eager)
        def tick(self):
            Ticker.running += 1
            Ticker.overlap |= Ticker.running > 1
            ticks.append(time.monotonic())
            if duration:
                concurrency.sleep(duration)
            Ticker.running -= 1
            if fail:
                raise RuntimeError("tick failed")

    return Ticker


def setup_function():
    ticks.clear()


def test_eager_timer_fires_at_start(container_factory):
    container = container_factory(make_service(10, eager=True), {})
    started = time.monotonic()
    container.start()
    wait_for(lambda: len(ticks) == 1, timeout=2)
    assert ticks[0] - started < 5  # far before the first interval would end


def test_lazy_timer_waits_one_interval_then_keeps_firing(container_factory):
    container = container_factory(make_service(0.05), {})
    container.start()
    concurrency.sleep(0.01)
    assert ticks == []
    wait_for(lambda: len(ticks) >= 4, timeout=5)


def test_a_slow_run_never_overlaps_the_next(container_factory):
    service = make_service(0.01, duration=0.05)
    container = container_factory(service, {})
    container.start()
    wait_for(lambda: len(ticks) >= 4, timeout=5)
    assert service.overlap is False


def test_errors_are_logged_and_the_timer_keeps_going(container_factory):
    container = container_factory(make_service(0.02, fail=True), {})
    container.start()
    wait_for(lambda: len(ticks) >= 3, timeout=5)
    assert not container._died.ready()


def test_stop_waits_for_the_running_tick_then_no_more_fire(container_factory):
    container = container_factory(make_service(0.01, eager=True, duration=0.2), {})
    container.start()
    wait_for(lambda: len(ticks) == 1, timeout=2)
    with concurrency.Timeout(5):
        container.stop()
    count = len(ticks)
    concurrency.sleep(0.1)
    assert len(ticks) == count


def test_the_drain_deadline_bounds_a_running_tick(container_factory):
    container = container_factory(
        make_service(0.01, eager=True, duration=30), {"DRAIN_TIMEOUT": 0.2}
    )
    container.start()
    wait_for(lambda: len(ticks) == 1, timeout=2)
    started = time.monotonic()
    with concurrency.Timeout(10):
        container.stop()
    assert time.monotonic() - started < 10


def test_a_zero_interval_timer_fires_once_while_killed(container_factory, caplog):
    # nameko's test_kill_stops_timer: wait_for_call sees the first tick at once
    # (it yields to the hub before polling), and nothing fires after kill().
    from unittest.mock import Mock

    from framework.testing.utils import wait_for_call

    tracker = Mock()

    class Busy:
        name = "busy"

        @timer(0)
        def tick(self):
            tracker()

    container = container_factory(Busy)
    container.start()
    with wait_for_call(1, tracker):
        container.kill()
    concurrency.sleep(0.05)  # room for a timer that is still alive to fire
    assert tracker.call_count == 1
    assert "ContainerBeingKilled" not in caplog.text


# -- @paced: the loop whose method returns the next wait ---------------------------------


def make_paced_service(returns, max_wait=1.0, error_wait=1.0):
    class Paced:
        name = "paced"
        calls: list[float] = []

        @paced(max_wait=max_wait, error_wait=error_wait)
        def claim(self):
            Paced.calls.append(time.monotonic())
            if isinstance(returns, Exception):
                raise returns
            return returns

    return Paced


def test_a_paced_method_runs_at_start_then_again_after_the_wait_it_returns(
    container_factory,
):
    service = make_paced_service(0.05)
    container_factory(service, {}).start()
    wait_for(lambda: len(service.calls) >= 4, timeout=5)
    gaps = [b - a for a, b in zip(service.calls, service.calls[1:], strict=False)]
    assert all(gap >= 0.04 for gap in gaps), gaps


def test_a_paced_wait_is_capped_and_an_error_waits_the_error_wait(container_factory):
    capped = make_paced_service(3600, max_wait=0.02)
    failing = make_paced_service(RuntimeError("database down"), error_wait=0.02)
    container_factory(capped, {}).start()
    container = container_factory(failing, {})
    container.start()
    wait_for(lambda: len(capped.calls) >= 3 and len(failing.calls) >= 3, timeout=5)
    assert not container._died.ready()


def test_killing_a_container_mid_paced_loop_leaves_no_error_and_no_thread(
    container_factory, caplog
):
    calls = []

    class Busy:
        name = "busy"

        @paced()
        def claim(self):
            calls.append(None)
            if len(calls) == 3:
                # The kill starts as this worker ends, the loop about to spawn
                # the next one.
                concurrency.spawn_n(container.kill)
            return 0

    container = container_factory(Busy)
    container.start()
    with concurrency.Timeout(5):
        container.wait()
    count = len(calls)
    concurrency.sleep(0.05)  # room for a loop that is still alive to call again
    assert len(calls) == count
    assert container._managed_threads == {}
    assert container._worker_threads == {}
    assert "ContainerBeingKilled" not in caplog.text
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


def test_a_paced_loop_whose_worker_meets_a_container_being_killed_ends_quietly(
    container_factory, caplog
):
    from framework.exceptions import ContainerBeingKilled

    service = make_paced_service(0)
    container = container_factory(service, {})
    spawn_worker = container.spawn_worker

    def spawn_while_killed(*args, **kwargs):
        # What spawn_worker does once kill() has begun.
        if len(service.calls) >= 2:
            raise ContainerBeingKilled()
        return spawn_worker(*args, **kwargs)

    container.spawn_worker = spawn_while_killed
    container.start()
    wait_for(lambda: len(service.calls) == 2, timeout=5)
    wait_for(lambda: "paced[claim]" not in container._managed_threads.values())
    assert not container._died.ready()  # the loop's end is not an error
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
