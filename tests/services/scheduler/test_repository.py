"""The claim and the run records on SQLite (no broker, no server): what one replica
does with a due schedule. The race between replicas needs PostgreSQL and is in
``test_integration`` and ``test_replicas``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy.orm

from framework.database import Session, create_engine
from services.scheduler.claiming import SchedulerSettings, utc
from services.scheduler.models import Run, Schedule
from services.scheduler.repository import ScheduleRepository
from services.scheduler.schemas import parse_schedule
from services.scheduler.targets import Outcome
from tests.services.scheduler.conftest import migrate

SETTINGS = SchedulerSettings(
    replica="test", misfire_grace=timedelta(seconds=5), lost_after=timedelta(seconds=5)
)


@pytest.fixture
def repository(tmp_path: Path) -> Iterator[ScheduleRepository]:
    url = f"sqlite:///{tmp_path / 'scheduler.sqlite3'}"
    migrate(url)
    engine = create_engine(url)
    session = sqlalchemy.orm.sessionmaker(
        bind=engine, class_=Session, expire_on_commit=False
    )()
    session.query(Schedule).delete()  # the built-ins
    session.commit()
    yield ScheduleRepository(session, SETTINGS)
    session.close()
    engine.dispose()


def add(repository: ScheduleRepository, **fields: Any) -> Schedule:
    return repository.add(
        parse_schedule(
            {
                "name": "every second",
                "cron": "* * * * * *",
                "target": {"kind": "rpc", "service": "t", "method": "m"},
                **fields,
            }
        )
    )


def overdue(repository: ScheduleRepository, schedule: Schedule, seconds: int) -> None:
    whole_second = datetime.now(UTC).replace(microsecond=0)
    schedule.next_fire_at = whole_second - timedelta(seconds=seconds)
    repository.session.commit()


def test_the_built_in_schedules_are_created_by_the_migration(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.sqlite3'}"
    migrate(url)
    engine = create_engine(url)
    session = sqlalchemy.orm.sessionmaker(bind=engine, class_=Session)()
    targets = {
        (s.target["service"], s.target["method"], s.cron, s.enabled)
        for s in session.query(Schedule)
    }
    session.close()
    engine.dispose()
    assert targets == {
        ("conversions", "requeue_stalled", "* * * * *", True),
        ("conversions", "purge_expired", "0 3 * * *", True),
        ("conversions", "export_users", "30 2 * * *", True),
    }


def test_a_due_tick_is_claimed_once_and_the_next_pass_finds_nothing_more(
    repository: ScheduleRepository,
) -> None:
    schedule = add(repository, overlap_policy="allow")
    overdue(repository, schedule, 0)

    first = repository.claim_due()
    second = repository.claim_due()

    claimed = [launch.scheduled_for for launch in first.launches + second.launches]
    assert len(claimed) == len(set(claimed)) >= 1
    assert repository.session.query(Run).count() == len(claimed)
    assert 0 <= first.wait <= 1


def test_a_run_is_finished_once_with_its_start_on_the_database_clock(
    repository: ScheduleRepository,
) -> None:
    schedule = add(repository)
    overdue(repository, schedule, 0)
    [launch, *_] = repository.claim_due().launches

    called = launch.database_time(launch.clock_read_at + 0.25)
    assert called == launch.clock_at + timedelta(seconds=0.25)
    finished = repository.finish_run(
        launch.run_id,
        Outcome("succeeded", result_summary="42"),
        launch.schedule,
        started_at=called,
    )
    assert finished is not None and finished[0].outcome == "succeeded"
    assert utc(finished[0].started_at) == called  # SQLite hands back naive UTC
    assert (
        repository.finish_run(launch.run_id, Outcome("failed"), launch.schedule) is None
    )


def test_an_invalid_expression_stored_by_hand_pauses_only_that_schedule(
    repository: ScheduleRepository,
) -> None:
    broken, healthy = add(repository), add(repository, name="healthy")
    broken.cron = "not cron"
    overdue(repository, broken, 0)
    overdue(repository, healthy, 0)

    launches = repository.claim_due().launches

    assert {launch.schedule["name"] for launch in launches} == {"healthy"}
    repository.session.refresh(broken)
    assert broken.enabled is False


def test_jitter_delays_each_call_by_up_to_its_seconds_and_its_deadline_with_it(
    repository: ScheduleRepository,
) -> None:
    schedule = add(repository, jitter_seconds=30, timeout_seconds=10)
    overdue(repository, schedule, 0)
    claimed_at = time.monotonic()

    launches = repository.claim_due().launches

    waits = [launch.call_at - claimed_at for launch in launches]
    assert launches and all(0 <= wait <= 30 + 1 for wait in waits)
    assert len(set(waits)) == len(waits)  # drawn for each run
    runs = repository.session.query(Run).all()
    assert all(
        run.deadline_at - run.claimed_at <= timedelta(seconds=30 + 1 + 10 + 5)
        for run in runs
    )
