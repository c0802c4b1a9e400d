"""The conversions service in a real container, on the real RabbitMQ and PostgreSQL.

Called as other services call it (a standalone ``ClusterRpcProxy``); events reach
a real listener service; the work goes through the real durable queue.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import polars as pl
import pytest

from framework.events import event_handler
from framework.standalone.rpc import ClusterRpcProxy
from framework.storage import FileStorage
from services.conversions.exceptions import (
    FileNotFound,
    InvalidOptions,
    JobNotFound,
    JobStateConflict,
    UnsupportedConversion,
)
from services.conversions.schemas import (
    CONVERSION_CANCELLED,
    CONVERSION_FAILED,
    CONVERSION_PROGRESS,
    CONVERSION_QUEUED,
    CONVERSION_STARTED,
    CONVERSION_SUCCEEDED,
)
from services.conversions.service import ConversionsService
from tests.helpers import wait_for
from tests.services.conversions.conftest import csv_bytes

pytestmark = pytest.mark.integration

RPC_TIMEOUT = 20


class ConversionEvents:
    """Stands in for the web service, which follows every conversion event."""

    name = "conversion_events_listener"
    seen: list[tuple[str, dict[str, Any]]] = []

    @event_handler("conversions", CONVERSION_QUEUED)
    def queued(self, payload: dict[str, Any]) -> None:
        self.seen.append((CONVERSION_QUEUED, payload))

    @event_handler("conversions", CONVERSION_STARTED)
    def started(self, payload: dict[str, Any]) -> None:
        self.seen.append((CONVERSION_STARTED, payload))

    @event_handler("conversions", CONVERSION_PROGRESS)
    def progress(self, payload: dict[str, Any]) -> None:
        self.seen.append((CONVERSION_PROGRESS, payload))

    @event_handler("conversions", CONVERSION_SUCCEEDED)
    def succeeded(self, payload: dict[str, Any]) -> None:
        self.seen.append((CONVERSION_SUCCEEDED, payload))

    @event_handler("conversions", CONVERSION_FAILED)
    def failed(self, payload: dict[str, Any]) -> None:
        self.seen.append((CONVERSION_FAILED, payload))

    @event_handler("conversions", CONVERSION_CANCELLED)
    def cancelled(self, payload: dict[str, Any]) -> None:
        self.seen.append((CONVERSION_CANCELLED, payload))


@pytest.fixture
def events(container_factory: Any, config: dict[str, Any]) -> list[Any]:
    ConversionEvents.seen = []
    container = container_factory(ConversionEvents, config)
    container.start()
    return ConversionEvents.seen


@pytest.fixture
def service(
    container_factory: Any, config: dict[str, Any], events: list[Any]
) -> Iterator[Any]:
    container = container_factory(ConversionsService, config)
    container.start()
    with ClusterRpcProxy(config, timeout=RPC_TIMEOUT) as rpc:
        yield rpc.conversions


def upload(storage: FileStorage, data: bytes, suffix: str = ".csv") -> str:
    key = storage.new_key(suffix)
    storage.write_bytes(key, data)
    return key


def wait_for_state(service: Any, job_id: str, *states: str, timeout: float = 60) -> Any:
    found: dict[str, Any] = {}

    def reached() -> bool:
        found["job"] = service.get_job(job_id)
        return found["job"]["state"] in states

    wait_for(reached, timeout=timeout, interval=0.1)
    return found["job"]


def test_a_csv_becomes_parquet_with_its_events(
    service: Any, storage: FileStorage, events: list[Any]
) -> None:
    key = upload(storage, csv_bytes(500))
    registered = service.register_file(key, "sales.csv", 0, 7)
    assert registered["format"] == "csv" and registered["size"] == storage.size(key)

    job = service.start_conversion(registered["id"], "parquet", {}, 7)
    assert job["state"] == "queued" and job["owner"] == 7

    done = wait_for_state(service, job["id"], "succeeded", "failed")
    assert done["state"] == "succeeded", done["error"]
    assert done["attempts"] == 1
    output = done["output"]
    assert output["name"] == "sales.parquet" and output["rows"] == 500
    with storage.open_read(output["storage_key"]) as stream:
        frame = pl.read_parquet(stream)
    assert frame.height == 500 and frame["c1"][3] == "text 3, 1"
    wait_for(lambda: any(kind == CONVERSION_SUCCEEDED for kind, _ in events))
    kinds = [kind for kind, payload in events if payload["job"]["id"] == job["id"]]
    assert kinds[0] == CONVERSION_QUEUED and CONVERSION_STARTED in kinds
    assert kinds[-1] == CONVERSION_SUCCEEDED


def test_requests_that_cannot_work_are_refused_at_once(
    service: Any, storage: FileStorage
) -> None:
    registered = service.register_file(upload(storage, b"a\n1\n"), "a.csv", 0, None)

    with pytest.raises(UnsupportedConversion):
        service.start_conversion(registered["id"], "pdf", {}, None)
    with pytest.raises(InvalidOptions) as caught:
        service.start_conversion(
            registered["id"], "parquet", {"write": {"compression": "lz4"}}, None
        )
    assert "write.compression" in caught.value.errors
    with pytest.raises(FileNotFound):
        service.start_conversion("00000000-0000-0000-0000-000000000000", "csv", {}, 1)
    with pytest.raises(FileNotFound):
        service.register_file(storage.new_key(), "x.csv", 0, None)
    with pytest.raises(InvalidOptions):
        service.register_file("../../etc/passwd", "x.csv", 0, None)
    with pytest.raises(JobNotFound):
        service.get_job("not-a-uuid")


def test_finished_jobs_cannot_be_cancelled_and_only_failed_ones_retried(
    service: Any, storage: FileStorage
) -> None:
    registered = service.register_file(upload(storage, b"a\n1\n"), "a.csv", 0, 42)
    job = service.start_conversion(registered["id"], "ndjson", {}, 42)
    wait_for_state(service, job["id"], "succeeded")

    with pytest.raises(JobStateConflict):
        service.cancel_job(job["id"])
    with pytest.raises(JobStateConflict):
        service.retry_job(job["id"])

    page = service.list_jobs(state="succeeded", owner=42)
    assert [item["id"] for item in page["items"]] == [job["id"]]
    assert page["total"] == 1 and page["page"] == 1

    output_key = service.get_job(job["id"])["output"]["storage_key"]
    assert service.delete_job(job["id"]) is None
    assert not storage.exists(output_key)
    with pytest.raises(JobNotFound):
        service.get_job(job["id"])


# Each bad input of the issue, as a user would send it: the job fails with a message
# that names the problem, and the service goes on answering.
BAD_UPLOADS = [
    ("ragged.csv", b"a,b\n1,2\n3,4,5\n", "line 3 has 3 fields"),
    ("empty.csv", b"", "the file is empty"),
    ("latin1.csv", "name\nJosé\n".encode("latin-1"), "not valid UTF-8"),
    ("cut.parquet", b"PAR1" + b"\x00" * 64, "truncated or damaged"),
    ("broken.xlsx", b"PK\x03\x04" + b"\x00" * 64, "XLSX"),
    ("one-line.csv", b"x" * 300_000, "line 1 is longer than"),
    ("image.csv", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary file"),
]


def test_bad_files_fail_their_jobs_with_clear_messages_and_the_service_goes_on(
    container_factory: Any, config: dict[str, Any], storage: FileStorage
) -> None:
    container = container_factory(
        ConversionsService, {**config, "CONVERSION_MAX_LINE_BYTES": 100_000}
    )
    container.start()
    with ClusterRpcProxy(config, timeout=RPC_TIMEOUT) as rpc:
        service = rpc.conversions
        jobs = {}
        for name, data, _ in BAD_UPLOADS:
            registered = service.register_file(upload(storage, data), name, 0, 9)
            jobs[name] = service.start_conversion(registered["id"], "csv", {}, 9)
        for name, _, message in BAD_UPLOADS:
            job = wait_for_state(service, jobs[name]["id"], "succeeded", "failed")
            assert job["state"] == "failed", name
            assert message in job["error"], (name, job["error"])
            assert job["output"] is None and job["finished_at"] is not None

        assert service.formats()["formats"]
        good = service.register_file(upload(storage, b"a\n1\n"), "good.csv", 0, 9)
        job = service.start_conversion(good["id"], "json", {}, 9)
        assert wait_for_state(service, job["id"], "succeeded", "failed")["state"] == (
            "succeeded"
        )


def test_rpc_is_answered_during_a_long_conversion_which_cancel_stops_cleanly(
    service: Any, storage: FileStorage, storage_dir: Any, events: list[Any]
) -> None:
    # XLSX is written a cell at a time: tens of thousands of rows take seconds.
    key = upload(storage, csv_bytes(40_000))
    registered = service.register_file(key, "long.csv", 0, 5)
    job = service.start_conversion(registered["id"], "xlsx", {}, 5)
    wait_for(
        lambda: any(
            kind == CONVERSION_PROGRESS and payload["job"]["id"] == job["id"]
            for kind, payload in events
        ),
        timeout=30,
    )

    # The conversion runs in this replica now; its RPC keeps answering.
    answering = service.get_job.with_timeout(10)(job["id"])
    assert answering["state"] == "running"
    assert service.formats.with_timeout(10)()["pairs"]

    cancelled = service.cancel_job(job["id"])
    assert cancelled["state"] == "cancelled"

    # No output and no temporary file: only the input is left in storage.
    wait_for(lambda: sorted(p.name for p in storage_dir.iterdir()) == [key], timeout=2)
    assert service.get_job(job["id"])["state"] == "cancelled"
    wait_for(lambda: any(kind == CONVERSION_CANCELLED for kind, _ in events))
    retried = service.retry_job(job["id"])
    assert retried["state"] == "queued"
    service.cancel_job(job["id"])
