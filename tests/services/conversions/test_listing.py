"""The jobs list: pages by number and by cursor, and its counted totals.

``list_jobs`` through ``worker_factory`` on a SQLite file migrated with the
service's revisions (``JobRepository`` and ``JobCounts`` real). Jobs are written
as rows with chosen creation times, so the expected order is known; "another
replica" is a second repository on the same database, with counts of its own.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy
import sqlalchemy.orm

from framework.database import Session, create_engine
from framework.storage import FileStorage
from framework.testing.services import worker_factory
from services.conversions.dependencies import (
    JobCounts,
    JobRepository,
)
from services.conversions.exceptions import InvalidOptions
from services.conversions.models import ConversionJob, StoredFile
from services.conversions.schemas import COUNT_MAX_AGE
from services.conversions.service import ConversionsService

START = datetime(2026, 11, 1, tzinfo=UTC)


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def open_repository(url: str, clock: Clock) -> Iterator[JobRepository]:
    engine = create_engine(url)
    session = sqlalchemy.orm.sessionmaker(bind=engine, class_=Session)()
    yield JobRepository(session, JobCounts(clock=clock))
    session.close()
    engine.dispose()


@pytest.fixture
def jobs(sqlite_url: str, clock: Clock) -> Iterator[JobRepository]:
    yield from open_repository(sqlite_url, clock)


@pytest.fixture
def elsewhere(sqlite_url: str, clock: Clock) -> Iterator[JobRepository]:
    """Another replica's repository: the same database, its own counts."""
    yield from open_repository(sqlite_url, clock)


@pytest.fixture
def service(jobs: JobRepository, storage: FileStorage) -> Any:
    return worker_factory(ConversionsService, jobs=jobs, storage=storage)


def add_file(jobs: JobRepository, owner: int = 4) -> str:
    row = jobs.add_file(
        StoredFile(
            id=str(uuid.uuid4()),
            name="in.csv",
            size=10,
            format="csv",
            owner=owner,
            storage_key=uuid.uuid4().hex,
            created_at=START,
        )
    )
    return row.id


@pytest.fixture
def file_id(jobs: JobRepository) -> str:
    return add_file(jobs)


def add_jobs(
    jobs: JobRepository,
    file_id: str,
    count: int,
    owner: int = 4,
    state: str = "succeeded",
    start: datetime = START,
    step: timedelta = timedelta(seconds=1),
) -> list[str]:
    """``count`` jobs created ``step`` apart from ``start``; their ids, oldest first."""
    ids = []
    for i in range(count):
        job_id = str(uuid.uuid4())
        jobs.add_job(
            ConversionJob(
                id=job_id,
                state=state,
                owner=owner,
                file_id=file_id,
                input_name=f"in-{i}.csv",
                input_format="csv",
                input_size=10,
                target_format="json",
                options={},
                output_key=uuid.uuid4().hex,
                output_name=f"in-{i}.json",
                progress_bytes=0,
                attempts=1,
                created_at=start + step * i,
            )
        )
        ids.append(job_id)
    return ids


def newest_first(ids: list[str]) -> list[str]:
    """The list's order of jobs added by one ``add_jobs`` with a positive step."""
    return list(reversed(ids))


def listed(page: dict[str, Any]) -> list[str]:
    return [job["id"] for job in page["items"]]


def every_page_by_cursor(service: Any, **query: Any) -> list[list[str]]:
    pages = []
    after = None
    while True:
        page = service.list_jobs(after=after, **query)
        pages.append(listed(page))
        after = page["next_cursor"]
        if after is None:
            return pages


def test_a_deep_page_by_number_holds_the_jobs_at_its_place_in_the_list(
    service: Any, jobs: JobRepository, file_id: str
) -> None:
    expected = newest_first(add_jobs(jobs, file_id, 95))

    page = service.list_jobs(page=7, per_page=10)
    last = service.list_jobs(page=10, per_page=10)
    beyond = service.list_jobs(page=11, per_page=10)

    assert listed(page) == expected[60:70]
    assert page["total"] == 95 and page["page"] == 7 and page["next_cursor"]
    assert listed(last) == expected[90:] and last["next_cursor"] is None
    assert listed(beyond) == [] and beyond["total"] == 95


def test_cursors_list_every_job_once_in_the_order_of_the_numbered_pages(
    service: Any, jobs: JobRepository, file_id: str
) -> None:
    # Three jobs to each creation time: the id decides between them.
    for _ in range(3):
        add_jobs(jobs, file_id, 9, start=START, step=timedelta(seconds=1))
    numbered = [
        listed(service.list_jobs(page=number, per_page=4)) for number in range(1, 8)
    ]

    by_cursor = every_page_by_cursor(service, per_page=4)

    assert by_cursor == numbered
    flat = [job_id for page in by_cursor for job_id in page]
    assert len(flat) == len(set(flat)) == 27


def test_the_page_after_a_cursor_does_not_shift_when_newer_jobs_arrive(
    service: Any, jobs: JobRepository, file_id: str
) -> None:
    expected = newest_first(add_jobs(jobs, file_id, 12))
    first = service.list_jobs(page=1, per_page=5)

    add_jobs(jobs, file_id, 3, start=START + timedelta(days=1))
    second = service.list_jobs(after=first["next_cursor"], page=2, per_page=5)
    second_by_number = service.list_jobs(page=2, per_page=5)

    assert listed(second) == expected[5:10]
    assert second["page"] == 2 and second["total"] == 15
    # By number, the same page now starts with jobs the first page showed.
    assert listed(second_by_number)[:3] == expected[2:5]


def test_a_cursor_keeps_to_the_filters_it_is_used_with(
    service: Any, jobs: JobRepository, file_id: str
) -> None:
    mine = newest_first(add_jobs(jobs, file_id, 7, owner=4, state="failed"))
    add_jobs(jobs, file_id, 7, owner=4, state="succeeded")
    add_jobs(jobs, file_id, 7, owner=8, state="failed")

    pages = every_page_by_cursor(service, owner=4, state="failed", per_page=3)

    assert pages == [mine[0:3], mine[3:6], mine[6:]]


def test_an_after_that_is_no_cursor_is_refused_with_the_field_named(
    service: Any,
) -> None:
    for bad in ("not a cursor", "", "x" * 500, 17, "MjAyNnxub3QtYS11dWlk"):
        with pytest.raises(InvalidOptions) as refused:
            service.list_jobs(after=bad)
        assert set(refused.value.errors) == {"after"}


def test_the_total_is_exact_at_once_after_a_change_made_through_this_replica(
    service: Any, jobs: JobRepository, file_id: str
) -> None:
    add_jobs(jobs, file_id, 5)
    assert service.list_jobs()["total"] == 5
    assert service.list_jobs(state="queued")["total"] == 0

    started = service.start_conversion(file_id, "json", {}, 4)
    assert service.list_jobs()["total"] == 6
    assert service.list_jobs(state="queued")["total"] == 1

    service.cancel_job(started["id"])
    assert service.list_jobs(state="queued")["total"] == 0
    assert service.list_jobs(state="cancelled")["total"] == 1

    service.delete_job(started["id"])
    assert service.list_jobs()["total"] == 5
    assert service.list_jobs(state="cancelled")["total"] == 0


def test_a_change_made_by_another_replica_is_counted_within_count_max_age(
    service: Any,
    jobs: JobRepository,
    elsewhere: JobRepository,
    file_id: str,
    clock: Clock,
) -> None:
    add_jobs(jobs, file_id, 5)
    assert service.list_jobs()["total"] == 5

    added = add_jobs(elsewhere, file_id, 2)
    clock.now += COUNT_MAX_AGE
    assert service.list_jobs()["total"] == 7

    elsewhere.delete_job(added[0])
    clock.now += COUNT_MAX_AGE
    page = service.list_jobs()
    assert page["total"] == 6 and len(page["items"]) == 6


def test_a_count_that_ran_while_a_change_committed_is_not_kept(
    clock: Clock,
) -> None:
    counts = JobCounts(clock=clock)
    database = {"jobs": 3}

    def count_during_a_change() -> int:
        seen = database["jobs"]
        database["jobs"] += 1
        counts.changed()  # the change commits while the count runs
        return seen

    assert counts.get(("all",), count_during_a_change) == 3
    assert counts.get(("all",), lambda: database["jobs"]) == 4


@pytest.mark.parametrize(
    "query",
    [{}, {"owner": 4}, {"state": "failed"}, {"owner": 4, "state": "failed"}],
    ids=["all", "owner", "state", "owner and state"],
)
def test_the_keys_of_a_page_come_from_an_index_alone_under_every_filter(
    jobs: JobRepository, file_id: str, query: dict[str, Any]
) -> None:
    add_jobs(jobs, file_id, 30)
    plans: list[list[str]] = []

    def explain(connection: Any, cursor: Any, statement: str, *args: Any) -> None:
        if " JOIN " in statement:  # the page's query, not the total's count
            plans.append(
                [
                    str(row[-1])
                    for row in cursor.connection.execute(
                        "EXPLAIN QUERY PLAN " + statement, args[0]
                    )
                ]
            )

    engine = jobs.session.get_bind()
    sqlalchemy.event.listen(engine, "before_cursor_execute", explain)
    try:
        state, owner = query.get("state"), query.get("owner")
        jobs.search(state, owner, 2, 10)
        jobs.search(state, owner, 1, 10, (START, str(uuid.UUID(int=0))))
    finally:
        sqlalchemy.event.remove(engine, "before_cursor_execute", explain)

    assert len(plans) == 2
    for plan in plans:
        keys = [step for step in plan if "COVERING INDEX ix_jobs_" in step]
        assert len(keys) == 1, plan
        # No table scan, and the filter's jobs are read in the index's order:
        # the one sort is the outer one, of the page's rows alone.
        assert not any(
            step.startswith("SCAN jobs") and "INDEX" not in step for step in plan
        ), plan
        assert sum("TEMP B-TREE" in step for step in plan) <= 1, plan


# -- PostgreSQL, as deployed ---------------------------------------------------------


@pytest.fixture
def pg_jobs(pg_url: str, clock: Clock) -> Iterator[JobRepository]:
    yield from open_repository(pg_url, clock)


def test_on_postgresql_deep_pages_and_cursors_list_the_same_jobs_from_an_index(
    pg_jobs: JobRepository, storage: FileStorage
) -> None:
    service = worker_factory(ConversionsService, jobs=pg_jobs, storage=storage)
    owner = uuid.uuid4().int % 1_000_000 + 1000  # the module's database is shared
    file_id = add_file(pg_jobs, owner)
    expected = newest_first(add_jobs(pg_jobs, file_id, 2000, owner=owner))
    # Three newer jobs created at the same time: the id decides between them.
    same_time = add_jobs(
        pg_jobs,
        file_id,
        3,
        owner=owner,
        start=START + timedelta(days=1),
        step=timedelta(0),
    )
    expected = sorted(same_time, reverse=True) + expected
    # What autovacuum does to a table after inserts: statistics, and the
    # visibility map that lets a scan answer from the index alone.
    engine = pg_jobs.session.get_bind()
    with engine.connect() as connection:  # type: ignore[union-attr]
        connection.execution_options(isolation_level="AUTOCOMMIT").execute(
            sqlalchemy.text("VACUUM ANALYZE jobs")
        )

    deep = service.list_jobs(owner=owner, page=80, per_page=20)
    after = service.list_jobs(owner=owner, after=deep["next_cursor"], per_page=20)
    plan = "\n".join(
        row[0]
        for row in pg_jobs.session.execute(
            sqlalchemy.text(
                "EXPLAIN SELECT id FROM jobs WHERE owner = :owner"
                " ORDER BY created_at DESC, id DESC OFFSET 1580 LIMIT 21"
            ),
            {"owner": owner},
        )
    )

    assert listed(deep) == expected[1580:1600] and deep["total"] == 2003
    assert listed(after) == expected[1600:1620]
    assert "Index Only Scan Backward using ix_jobs_owner_created_id" in plan, plan
