"""``ConversionsService``'s methods through ``worker_factory``, on a SQLite file.

The repository, the storage and the job runner (with its child processes) are
real; the event dispatcher, the job publisher and the users service are mocks:
who hears an event, who takes a queued message and what another service answers
are outside this service, and the test asserts on the calls made across.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest.mock import MagicMock

import polars as pl
import pytest

from framework import concurrency
from framework.storage import FileStorage
from framework.testing.services import worker_factory
from services.conversions.dependencies import JobRepository
from services.conversions.exceptions import (
    FileNotFound,
    InvalidOptions,
    JobNotFound,
    JobStateConflict,
)
from services.conversions.models import ConversionJob
from services.conversions.runner import JobRunner
from services.conversions.schemas import (
    CONVERSION_CANCELLED,
    CONVERSION_QUEUED,
    CONVERSION_STARTED,
    CONVERSION_SUCCEEDED,
)
from services.conversions.service import ConversionsService


@pytest.fixture
def runner() -> JobRunner:
    return JobRunner("test-replica", 0.1, 1.0, concurrency.Semaphore(2))


@pytest.fixture
def service(repository: JobRepository, storage: FileStorage, runner: JobRunner) -> Any:
    return worker_factory(
        ConversionsService, jobs=repository, storage=storage, runner=runner
    )


def register(service: Any, data: bytes = b"a,b\n1,2\n", name: str = "t.csv") -> Any:
    key = service.storage.new_key()
    service.storage.write_bytes(key, data)
    return service.register_file(key, name, 12345, 4)


def events(service: Any) -> list[str]:
    return [call.args[0] for call in service.dispatch.call_args_list]


def test_register_file_detects_the_format_and_records_the_stored_size(
    service: Any,
) -> None:
    by_name = register(service, b"a\tb\n1\t2\n", "dir/../data.TSV")
    by_content = register(service, b'[{"a": 1}]', "export")

    assert by_name["format"] == "tsv" and by_name["name"] == "data.TSV"
    assert by_name["size"] == 8 and by_name["owner"] == 4
    assert by_content["format"] == "json"
    assert "storage_key" not in by_name
    assert service.get_file(by_name["id"])["storage_key"]


def test_register_file_refuses_keys_it_could_not_have_made(service: Any) -> None:
    with pytest.raises(InvalidOptions):
        service.register_file("../secrets", "x.csv", 1, None)
    with pytest.raises(FileNotFound):
        service.register_file(service.storage.new_key(), "x.csv", 1, None)


def test_start_conversion_records_a_queued_job_and_queues_it(service: Any) -> None:
    file = register(service)

    job = service.start_conversion(file["id"], "parquet", {"columns": ["a"]}, 4)

    assert job["state"] == "queued" and job["attempts"] == 0
    assert job["input"] == {
        "file_id": file["id"],
        "name": "t.csv",
        "format": "csv",
        "size": 8,
    }
    assert job["options"] == {"columns": ["a"]}
    assert service.queue_job.call_args.args == ({"job_id": job["id"]},)
    assert events(service) == [CONVERSION_QUEUED]


def test_run_job_converts_and_a_redelivery_of_a_finished_job_is_skipped(
    service: Any,
) -> None:
    job = service.start_conversion(register(service)["id"], "ndjson", {}, 4)

    service.run_job({"job_id": job["id"]})
    service.run_job({"job_id": job["id"]})

    done = service.get_job(job["id"])
    assert done["state"] == "succeeded" and done["attempts"] == 1
    assert done["output"]["rows"] == 1 and done["progress"]["percent"] == 100
    with service.storage.open_read(done["output"]["storage_key"]) as stream:
        assert stream.read() == b'{"a":1,"b":2}\n'
    assert events(service).count(CONVERSION_STARTED) == 1
    assert events(service)[-1] == CONVERSION_SUCCEEDED


def test_list_jobs_is_newest_first_filtered_and_paginated(service: Any) -> None:
    file = register(service)
    made = [service.start_conversion(file["id"], "json", {}, 4) for _ in range(3)]
    other = service.start_conversion(file["id"], "json", {}, 8)
    service.cancel_job(made[0]["id"])

    page = service.list_jobs(owner=4, page=1, per_page=2)
    assert [job["id"] for job in page["items"]] == [made[2]["id"], made[1]["id"]]
    assert page["total"] == 3 and page["per_page"] == 2
    assert service.list_jobs(state="cancelled")["items"][0]["id"] == made[0]["id"]
    assert service.list_jobs(owner=8)["items"][0]["id"] == other["id"]
    with pytest.raises(InvalidOptions):
        service.list_jobs(state="paused")


def test_cancel_and_retry_follow_the_job_states(service: Any) -> None:
    job = service.start_conversion(register(service)["id"], "csv", {}, 4)

    assert service.cancel_job(job["id"])["state"] == "cancelled"
    assert events(service)[-1] == CONVERSION_CANCELLED
    with pytest.raises(JobStateConflict):
        service.cancel_job(job["id"])
    retried = service.retry_job(job["id"])
    assert retried["state"] == "queued" and retried["finished_at"] is None
    with pytest.raises(JobStateConflict):
        service.retry_job(job["id"])
    with pytest.raises(JobNotFound):
        service.cancel_job("7f6e0c55-8ad5-4a5e-9f43-4d4b2ad2f0c1")


def test_delete_and_purge_remove_jobs_and_their_outputs(
    service: Any, repository: JobRepository
) -> None:
    file = register(service)
    first = service.start_conversion(file["id"], "json", {}, 4)
    second = service.start_conversion(file["id"], "json", {}, 4)
    for job in (first, second):
        service.run_job({"job_id": job["id"]})
    outputs = [
        service.get_job(job["id"])["output"]["storage_key"] for job in (first, second)
    ]
    row = repository.session.get(ConversionJob, second["id"])
    row.finished_at = datetime.now(UTC) - timedelta(days=2)
    repository.session.commit()

    service.delete_job(first["id"])
    purged = service.purge_expired(86400)

    assert purged["jobs"] == 1
    assert not any(service.storage.exists(key) for key in outputs)
    with pytest.raises(JobNotFound):
        service.get_job(second["id"])


def test_requeue_stalled_queues_running_jobs_without_a_heartbeat(
    service: Any, repository: JobRepository
) -> None:
    job = service.start_conversion(register(service)["id"], "csv", {}, 4)
    row = repository.session.get(ConversionJob, job["id"])
    row.state, row.heartbeat_at = "running", datetime.now(UTC) - timedelta(minutes=5)
    repository.session.commit()
    service.queue_job.reset_mock()

    assert service.requeue_stalled(60) == {"requeued": [job["id"]]}

    assert service.get_job(job["id"])["state"] == "queued"
    assert service.queue_job.call_count == 1
    assert service.requeue_stalled(60) == {"requeued": []}


def test_export_users_pages_through_the_users_service_into_a_queued_job(
    service: Any,
) -> None:
    def list_users(page: int, per_page: int) -> dict[str, Any]:
        user = {"id": page, "email": f"u{page}@example.com", "display_name": "Ü"}
        return {"items": [{**user, "role": "member", "is_active": True}], "pages": 2}

    service.users = MagicMock()
    service.users.list_users.side_effect = list_users

    job = service.export_users("parquet")

    assert job["state"] == "queued" and job["owner"] is None
    assert job["target_format"] == "parquet"
    key = service.get_file(job["input"]["file_id"])["storage_key"]
    with service.storage.open_read(key) as stream:
        lines = stream.read().decode().splitlines()
    assert lines[0] == "id,email,display_name,role,is_active,created_at"
    assert lines[1:] == [
        "1,u1@example.com,Ü,member,True,",
        "2,u2@example.com,Ü,member,True,",
    ]


def test_a_storage_that_is_not_local_works_through_local_copies(
    repository: JobRepository, runner: JobRunner
) -> None:
    # memory:// stands for S3 and the like: no local paths, fsspec only.
    remote = FileStorage(f"memory://conversions-{uuid.uuid4().hex}")
    service = worker_factory(
        ConversionsService, jobs=repository, storage=remote, runner=runner
    )
    job = service.start_conversion(register(service)["id"], "parquet", {}, 4)

    service.run_job({"job_id": job["id"]})

    done = service.get_job(job["id"])
    assert done["state"] == "succeeded", done["error"]
    with remote.open_read(done["output"]["storage_key"]) as stream:
        assert pl.read_parquet(stream).rows() == [(1, 2)]
    assert remote.local_path(done["output"]["storage_key"]) is None


def test_a_job_whose_run_breaks_is_given_back_for_the_retry(
    service: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = service.start_conversion(register(service)["id"], "csv", {}, 4)

    def broken(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("the database went away")

    monkeypatch.setattr(concurrency, "run_in_process", broken)
    with pytest.raises(ConnectionError):
        service.run_job({"job_id": job["id"]})

    # Queued again at once, so the redelivered message can claim it.
    assert service.get_job(job["id"])["state"] == "queued"
