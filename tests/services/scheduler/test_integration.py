"""The scheduler in a real container, on the real RabbitMQ and PostgreSQL.

Targets are real services on the same broker; schedules fire every second
(six-field cron), so each test waits a few seconds at most. Missed ticks are made
the way an outage makes them: by moving a schedule's ``next_fire_at`` into the past.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC
from typing import Any

import pytest

from framework import concurrency
from framework.contextdata import ContextDataProvider
from framework.events import event_handler
from framework.rpc import rpc
from framework.standalone.rpc import ClusterRpcProxy
from services.scheduler.claiming import CLAIM_AHEAD_SECONDS
from services.scheduler.exceptions import InvalidSchedule, ScheduleNotFound
from services.scheduler.schemas import (
    SCHEDULE_RUN_FINISHED,
    SCHEDULE_RUN_STARTED,
    SCHEDULED_FOR_CONTEXT_KEY,
)
from services.scheduler.service import SchedulerService
from tests.helpers import wait_for
from tests.services.scheduler.conftest import query

pytestmark = pytest.mark.integration

EVERY_SECOND = "* * * * * *"
RPC_TIMEOUT = 10


class TickFor(ContextDataProvider):
    context_key = SCHEDULED_FOR_CONTEXT_KEY


class TargetService:
    """Stands in for the services a schedule calls, recording every call."""

    name = "target"
    calls: list[tuple[str, str | None]] = []
    events: list[tuple[str, dict[str, Any]]] = []
    tick = TickFor()

    @rpc
    def record(self, label: str = "") -> dict[str, Any]:
        TargetService.calls.append((label, self.tick))
        return {"recorded": label}

    @rpc
    def explode(self) -> None:
        raise ValueError("disk full")

    @rpc
    def linger(self, seconds: float) -> None:
        TargetService.calls.append(("linger", self.tick))
        concurrency.sleep(seconds)

    @event_handler("scheduler", "nightly_report")
    def on_nightly_report(self, payload: dict[str, Any]) -> None:
        TargetService.calls.append(("event", self.tick))

    @event_handler("scheduler", SCHEDULE_RUN_STARTED)
    def on_started(self, payload: dict[str, Any]) -> None:
        TargetService.events.append((SCHEDULE_RUN_STARTED, payload))

    @event_handler("scheduler", SCHEDULE_RUN_FINISHED)
    def on_finished(self, payload: dict[str, Any]) -> None:
        TargetService.events.append((SCHEDULE_RUN_FINISHED, payload))


@pytest.fixture(autouse=True)
def _clear_calls() -> None:
    TargetService.calls.clear()
    TargetService.events.clear()


@pytest.fixture
def scheduler(container_factory: Any, config: dict[str, Any]) -> Any:
    container = container_factory(SchedulerService, config)
    container.start()
    return container


@pytest.fixture
def target(container_factory: Any, config: dict[str, Any]) -> Any:
    container = container_factory(TargetService, config)
    container.start()
    return container


@pytest.fixture
def client(config: dict[str, Any]) -> Iterator[Any]:
    with ClusterRpcProxy(config, timeout=RPC_TIMEOUT) as proxy:
        yield proxy.scheduler


def rpc_target(method: str, **kwargs: Any) -> dict[str, Any]:
    return {"kind": "rpc", "service": "target", "method": method, "kwargs": kwargs}


def new_schedule(client: Any, **fields: Any) -> dict[str, Any]:
    return client.create_schedule(
        {
            "name": "test",
            "cron": EVERY_SECOND,
            "target": rpc_target("record", label="a"),
            **fields,
        }
    )


def runs(url: str, schedule_id: int) -> list[dict[str, Any]]:
    rows = query(
        url,
        "SELECT scheduled_for, outcome, error, started_at FROM runs "
        "WHERE schedule_id = %s ORDER BY scheduled_for",
        schedule_id,
    )
    return [
        {"scheduled_for": row[0], "outcome": row[1], "error": row[2], "started": row[3]}
        for row in rows
    ]


def outcomes(url: str, schedule_id: int) -> list[str]:
    return [run["outcome"] for run in runs(url, schedule_id)]


# -- the API ---------------------------------------------------------------------------


def test_a_schedule_is_created_listed_and_shown_with_its_next_fire_times(
    scheduler: Any, client: Any
) -> None:
    created = new_schedule(
        client, cron="30 2 * * *", timezone="Europe/Paris", name="nightly"
    )
    assert created["missed_run_policy"] == "skip"
    assert created["target"] == rpc_target("record", label="a")

    shown = client.get_schedule(created["id"])
    assert len(shown["next_fire_times"]) == 5
    assert all(t.endswith(("+01:00", "+02:00")) for t in shown["next_fire_times"])
    assert all("T02:30:00" in t or "T03:00:00" in t for t in shown["next_fire_times"])
    assert shown["last_runs"] == []
    page = client.list_schedules()
    assert [item["name"] for item in page["items"]] == ["nightly"]
    assert page["total"] == 1


def test_a_bad_schedule_is_refused_with_every_reason_and_nothing_is_stored(
    scheduler: Any, client: Any, pg_scheduler: str
) -> None:
    with pytest.raises(InvalidSchedule) as caught:
        client.create_schedule(
            {
                "name": "bad",
                "cron": "61 * * * *",
                "timezone": "Atlantis/Capital",
                "target": {"kind": "rpc", "service": "no such", "method": "x"},
            }
        )
    assert set(caught.value.errors) == {"cron", "timezone", "target.service"}
    assert query(pg_scheduler, "SELECT count(*) FROM schedules") == [(0,)]


def test_an_unknown_schedule_is_reported_as_such(scheduler: Any, client: Any) -> None:
    with pytest.raises(ScheduleNotFound):
        client.get_schedule(4242)
    with pytest.raises(ScheduleNotFound):
        client.update_schedule(4242, {"name": "x"})


def test_preview_lists_the_next_five_fire_times(scheduler: Any, client: Any) -> None:
    times = client.preview("0 9 * * 1", "America/New_York")
    assert len(times) == 5
    assert all("T09:00:00-0" in t for t in times)
    with pytest.raises(InvalidSchedule) as caught:
        client.preview("0 9 * *", "UTC")
    assert list(caught.value.errors) == ["cron"]


# -- firing ------------------------------------------------------------------------------


def test_every_tick_calls_the_target_once_with_the_tick_in_its_context(
    scheduler: Any, target: Any, client: Any, pg_scheduler: str
) -> None:
    # Overlap "allow": on a loaded machine one call can outlast a second, and the
    # default policy would then rightly skip the next tick; this test is about
    # every fired tick reaching the target exactly once.
    schedule = new_schedule(client, overlap_policy="allow")
    wait_for(
        lambda: outcomes(pg_scheduler, schedule["id"]).count("succeeded") >= 3,
        timeout=15,
    )

    recorded = runs(pg_scheduler, schedule["id"])
    assert {run["outcome"] for run in recorded} <= {"succeeded", "running"}
    ticks = [tick for _, tick in TargetService.calls]
    assert len(ticks) == len(set(ticks))
    succeeded = {
        run["scheduled_for"].astimezone(UTC).isoformat()
        for run in recorded
        if run["outcome"] == "succeeded"
    }
    assert succeeded <= set(ticks)
    shown = client.get_schedule(schedule["id"])
    summaries = {run["outcome"]: run["result_summary"] for run in shown["last_runs"]}
    assert summaries["succeeded"] == '{"recorded": "a"}'


def test_run_events_are_dispatched_with_the_schedule_and_the_outcome(
    scheduler: Any, target: Any, client: Any
) -> None:
    schedule = new_schedule(client)
    wait_for(
        lambda: any(kind == SCHEDULE_RUN_FINISHED for kind, _ in TargetService.events)
    )
    kind, body = next(e for e in TargetService.events if e[0] == SCHEDULE_RUN_FINISHED)
    assert body["schedule"]["id"] == schedule["id"]
    assert body["run"]["outcome"] == "succeeded"
    assert any(kind == SCHEDULE_RUN_STARTED for kind, _ in TargetService.events)


def test_an_event_target_is_dispatched_from_the_scheduler(
    scheduler: Any, target: Any, client: Any, pg_scheduler: str
) -> None:
    schedule = new_schedule(
        client,
        target={"kind": "event", "event_type": "nightly_report", "payload": {"a": 1}},
    )
    wait_for(lambda: "event" in [label for label, _ in TargetService.calls])
    wait_for(lambda: "succeeded" in outcomes(pg_scheduler, schedule["id"]))


@pytest.mark.parametrize(
    ("target_fields", "reason"),
    [
        (rpc_target("explode"), "target.explode raised ValueError"),
        (rpc_target("linger", seconds=5), "target.linger did not answer within 1s"),
        (
            {"kind": "rpc", "service": "absent", "method": "x", "kwargs": {}},
            "service absent is not running",
        ),
    ],
    ids=["raises", "times-out", "service-down"],
)
def test_a_failing_target_is_a_failed_run_with_its_reason_and_others_keep_firing(
    scheduler: Any,
    target: Any,
    client: Any,
    pg_scheduler: str,
    target_fields: dict[str, Any],
    reason: str,
) -> None:
    failing = new_schedule(
        client, target=target_fields, timeout_seconds=1, overlap_policy="allow"
    )
    healthy = new_schedule(client, name="healthy")

    wait_for(lambda: "failed" in outcomes(pg_scheduler, failing["id"]), timeout=15)
    failed = next(
        r for r in runs(pg_scheduler, failing["id"]) if r["outcome"] == "failed"
    )
    assert failed["error"].startswith(reason)
    count = outcomes(pg_scheduler, healthy["id"]).count("succeeded")
    wait_for(
        lambda: outcomes(pg_scheduler, healthy["id"]).count("succeeded") >= count + 2
    )


def test_pause_stops_firing_resume_starts_again_and_run_now_runs_at_once(
    scheduler: Any, target: Any, client: Any, pg_scheduler: str
) -> None:
    schedule = new_schedule(client, cron="0 0 1 1 *")  # once a year
    paused = client.pause(schedule["id"])
    assert paused["enabled"] is False

    run = client.run_now(schedule["id"])  # paused or not: asked for
    assert run["outcome"] == "running"
    wait_for(lambda: outcomes(pg_scheduler, schedule["id"]) == ["succeeded"])

    client.update_schedule(schedule["id"], {"cron": EVERY_SECOND})
    concurrency.sleep(1.5)
    assert outcomes(pg_scheduler, schedule["id"]) == ["succeeded"]  # still paused
    client.resume(schedule["id"])
    wait_for(lambda: len(outcomes(pg_scheduler, schedule["id"])) >= 3)


# -- missed-run policies -------------------------------------------------------------------


def miss_ticks(url: str, schedule_id: int, seconds: int) -> Any:
    """As if no replica had run for ``seconds``: the schedule is that far behind."""
    [(first_missed,)] = query(
        url,
        "UPDATE schedules SET enabled = true, next_fire_at = "
        "date_trunc('second', now()) - make_interval(secs => %s) WHERE id = %s "
        "RETURNING next_fire_at",
        seconds,
        schedule_id,
    )
    return first_missed


def catch_up(url: str, schedule_id: int) -> tuple[list[float], list[float]]:
    """Ages (seconds before the first claim) of the ticks run late, and of all runs."""
    rows = query(
        url,
        "SELECT extract(epoch FROM first.claimed - scheduled_for)::float "
        "FROM runs, (SELECT min(claimed_at) AS claimed FROM runs WHERE schedule_id = %s)"
        " AS first WHERE schedule_id = %s ORDER BY scheduled_for",
        schedule_id,
        schedule_id,
    )
    ages = [row[0] for row in rows]
    # Ticks are claimed CLAIM_AHEAD_SECONDS ahead, and lateness counted from there.
    return [age for age in ages if age > GRACE - CLAIM_AHEAD_SECONDS], ages


GRACE = 5  # SCHEDULER_MISFIRE_GRACE_SECONDS's default


@pytest.mark.parametrize(
    ("policy", "window"),
    [("skip", 3600), ("run_once", 3600), ("run_all", 3600), ("run_all", 20)],
    ids=["skip", "run_once", "run_all", "run_all-window"],
)
def test_ticks_missed_during_an_outage_follow_the_missed_run_policy(
    container_factory: Any,
    config: dict[str, Any],
    target: Any,
    client: Any,
    pg_scheduler: str,
    policy: str,
    window: int,
) -> None:
    first = container_factory(SchedulerService, config)
    first.start()
    schedule = new_schedule(
        client,
        enabled=False,
        missed_run_policy=policy,
        catchup_window_seconds=window,
        overlap_policy="allow",
    )
    first.stop()
    first_missed = miss_ticks(pg_scheduler, schedule["id"], 60)  # down a minute
    container_factory(SchedulerService, config).start()
    wait_for(lambda: outcomes(pg_scheduler, schedule["id"]).count("succeeded") >= 3)

    late, ages = catch_up(pg_scheduler, schedule["id"])
    # Whatever the policy: one run per tick, and none of the ticks missed for
    # less than the grace is left out (they are on time).
    assert all(round(a - b) == 1 for a, b in itertools.pairwise(ages)), ages
    if policy == "skip":
        assert late == []
    elif policy == "run_once":
        assert len(late) == 1 and late[0] <= GRACE + 1  # the latest missed tick
    elif window == 3600:
        # all of them, from the first missed
        assert runs(pg_scheduler, schedule["id"])[0]["scheduled_for"] == first_missed
    else:
        # back to the window's start (counted from the claim's horizon)
        assert window - 1 - CLAIM_AHEAD_SECONDS <= max(late) <= window


# -- overlap policies ----------------------------------------------------------------------


def intervals(url: str, schedule_id: int) -> list[tuple[Any, Any, Any, str]]:
    return query(
        url,
        "SELECT scheduled_for, started_at, finished_at, outcome FROM runs "
        "WHERE schedule_id = %s ORDER BY scheduled_for",
        schedule_id,
    )


def overlapping(rows: list[tuple[Any, Any, Any, str]]) -> bool:
    ran = [(start, end) for _, start, end, outcome in rows if outcome == "succeeded"]
    return any(b[0] < a[1] for a, b in itertools.pairwise(sorted(ran)))


@pytest.mark.parametrize("policy", ["skip", "allow", "queue_one"])
def test_a_tick_due_while_the_previous_run_goes_follows_the_overlap_policy(
    scheduler: Any, target: Any, client: Any, pg_scheduler: str, policy: str
) -> None:
    # 2.5 s runs on a 1 s schedule: every run overlaps at least two ticks.
    schedule = new_schedule(
        client,
        target=rpc_target("linger", seconds=2.5),
        overlap_policy=policy,
        timeout_seconds=10,
    )
    wait_for(
        lambda: (
            [r[3] for r in intervals(pg_scheduler, schedule["id"])].count("succeeded")
            >= 2
        ),
        timeout=20,
    )
    rows = intervals(pg_scheduler, schedule["id"])
    outcomes_seen = [row[3] for row in rows]
    if policy == "allow":
        assert "skipped" not in outcomes_seen
        assert overlapping(rows)
        return
    assert "skipped" in outcomes_seen
    assert not overlapping(rows)
    first, second = [row for row in rows if row[3] == "succeeded"][:2]
    if policy == "queue_one":
        # The tick right after the first waited for it, keeping its own time.
        assert (second[0] - first[0]).total_seconds() == 1
        assert second[1] >= first[2]
    else:
        assert (second[0] - first[0]).total_seconds() > 1


# -- history and lost runs -------------------------------------------------------------------


def test_history_keeps_the_newest_runs_up_to_the_limit(
    scheduler: Any, target: Any, client: Any, pg_scheduler: str
) -> None:
    schedule = new_schedule(client, history_limit=2)
    wait_for(lambda: len(TargetService.calls) >= 5, timeout=15)
    wait_for(lambda: "running" not in outcomes(pg_scheduler, schedule["id"])[:-1])
    kept = client.list_runs(schedule["id"])
    # the limit, plus at most the run still going when the last one was trimmed
    assert 2 <= kept["total"] <= 3
    newest = max(tick for _, tick in TargetService.calls[:-1])
    assert newest in [run["scheduled_for"] for run in kept["items"]]


def test_a_run_whose_replica_died_is_marked_lost_by_another_and_not_fired_again(
    container_factory: Any,
    config: dict[str, Any],
    target: Any,
    client: Any,
    pg_scheduler: str,
) -> None:
    first = container_factory(SchedulerService, config)
    first.start()
    schedule = new_schedule(client, cron="0 0 1 1 *")  # not due in this test
    first.stop()
    # What a replica killed mid-run leaves: a run going, past its deadline.
    query(
        pg_scheduler,
        "INSERT INTO runs (schedule_id, scheduled_for, claimed_at, deadline_at, "
        "replica, outcome) VALUES (%s, now() - interval '1 minute', "
        "now() - interval '1 minute', now() - interval '1 second', 'gone', 'running')",
        schedule["id"],
    )
    container_factory(SchedulerService, config).start()

    wait_for(lambda: outcomes(pg_scheduler, schedule["id"]) == ["lost"])
    [run] = runs(pg_scheduler, schedule["id"])
    assert "replica gone recorded no outcome" in run["error"]
    wait_for(
        lambda: any(
            body["run"]["outcome"] == "lost" for _, body in TargetService.events
        )
    )
    assert TargetService.calls == []


def test_killing_a_replica_mid_loop_leaves_no_error_and_no_thread(
    scheduler: Any, target: Any, client: Any, pg_scheduler: str, caplog: Any
) -> None:
    schedule = new_schedule(client, overlap_policy="allow")
    wait_for(lambda: len(outcomes(pg_scheduler, schedule["id"])) >= 2, timeout=15)

    scheduler.kill()
    assert scheduler._managed_threads == {}
    assert scheduler._worker_threads == {}
    assert "ContainerBeingKilled" not in caplog.text
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


# -- backfill ----------------------------------------------------------------------------

HOURLY = "0 * * * *"
DAY = "2026-01-01T"


def backfilled_ticks(hours: range) -> list[str]:
    return [f"{DAY}{hour:02d}:00:00+00:00" for hour in hours]


def test_a_backfill_runs_each_past_tick_once_with_that_tick_in_its_context(
    scheduler: Any, target: Any, client: Any, pg_scheduler: str
) -> None:
    schedule = new_schedule(client, cron=HOURLY)
    answer = client.backfill(
        schedule["id"], f"{DAY}00:00:00+00:00", f"{DAY}03:00:00+00:00", "allow"
    )
    assert [run["scheduled_for"] for run in answer["runs"]] == backfilled_ticks(
        range(4)
    )
    assert answer["already_run"] == 0
    wait_for(lambda: outcomes(pg_scheduler, schedule["id"]) == ["succeeded"] * 4)
    assert sorted(tick for _, tick in TargetService.calls) == backfilled_ticks(range(4))

    # Overlapping the first: only the ticks without a run are run.
    again = client.backfill(
        schedule["id"], f"{DAY}02:00:00+00:00", f"{DAY}05:00:00+00:00", "allow"
    )
    assert [run["scheduled_for"] for run in again["runs"]] == backfilled_ticks(
        range(4, 6)
    )
    assert again["already_run"] == 2
    wait_for(lambda: outcomes(pg_scheduler, schedule["id"]) == ["succeeded"] * 6)
    assert sorted(tick for _, tick in TargetService.calls) == backfilled_ticks(range(6))
    history = client.list_runs(schedule["id"])
    assert history["total"] == 6


def test_a_backfill_follows_the_overlap_policy_like_a_catch_up(
    scheduler: Any, target: Any, client: Any, pg_scheduler: str
) -> None:
    schedule = new_schedule(
        client, cron=HOURLY, target=rpc_target("linger", seconds=0.5)
    )
    answer = client.backfill(
        schedule["id"], f"{DAY}00:00:00+00:00", f"{DAY}02:00:00+00:00"
    )  # the schedule's policy: skip
    assert [run["scheduled_for"] for run in answer["runs"]] == backfilled_ticks(
        range(1)
    )
    assert [run["outcome"] for run in answer["skipped"]] == ["skipped", "skipped"]
    wait_for(
        lambda: (
            outcomes(pg_scheduler, schedule["id"])
            == ["succeeded", "skipped", "skipped"]
        )
    )


def test_concurrent_backfills_on_two_replicas_run_each_tick_once(
    container_factory: Any,
    config: dict[str, Any],
    target: Any,
    client: Any,
    pg_scheduler: str,
) -> None:
    container_factory(SchedulerService, config).start()
    container_factory(SchedulerService, config).start()
    schedule = new_schedule(client, cron=HOURLY)

    def backfill() -> dict[str, Any]:
        with ClusterRpcProxy(config, timeout=RPC_TIMEOUT) as proxy:
            return proxy.scheduler.backfill(  # type: ignore[no-any-return]
                schedule["id"], f"{DAY}00:00:00+00:00", f"{DAY}09:00:00+00:00", "allow"
            )

    answers = [
        thread.wait() for thread in [concurrency.spawn(backfill) for _ in range(4)]
    ]
    assert sum(len(answer["runs"]) for answer in answers) == 10
    wait_for(lambda: outcomes(pg_scheduler, schedule["id"]) == ["succeeded"] * 10)
    assert sorted(tick for _, tick in TargetService.calls) == backfilled_ticks(
        range(10)
    )


@pytest.mark.parametrize(
    ("start", "end", "policy", "field"),
    [
        (f"{DAY}00:00:00+00:00", "2999-01-01T00:00:00+00:00", None, "end"),
        (f"{DAY}05:00:00+00:00", f"{DAY}01:00:00+00:00", None, "end"),
        (f"{DAY}00:00:00", f"{DAY}01:00:00+00:00", None, "start"),
        (f"{DAY}00:00:00+00:00", "2026-03-01T00:00:00+00:00", None, "end"),
        (f"{DAY}00:00:00+00:00", f"{DAY}01:00:00+00:00", "sometimes", "overlap_policy"),
    ],
    ids=["future", "end-before-start", "naive", "too-many-ticks", "bad-policy"],
)
def test_a_bad_backfill_is_refused_with_the_reason_and_runs_nothing(
    scheduler: Any,
    client: Any,
    pg_scheduler: str,
    start: str,
    end: str,
    policy: str | None,
    field: str,
) -> None:
    schedule = new_schedule(client, cron=HOURLY)
    with pytest.raises(InvalidSchedule) as caught:
        client.backfill(schedule["id"], start, end, policy)
    assert list(caught.value.errors) == [field]
    assert runs(pg_scheduler, schedule["id"]) == []
