"""The application from compose.yaml, used as its users use it: the public API and
the websocket, a browser, schedules. One application for the module, started with
compose's own commands, environment and healthchecks (see compose.py)."""

from __future__ import annotations

import io
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.csv
import pyarrow.parquet
import pytest
import requests

from .api import Api, Panel, csv_bytes
from .compose import LocalApp

ADMIN_EMAIL = "admin@example.com"  # compose.yaml's development defaults
ADMIN_PASSWORD = "admin-dev-password"


@pytest.fixture(scope="module")
def app(make_app: Any) -> Iterator[LocalApp]:
    app: LocalApp = make_app()
    app.up()
    yield app


@pytest.fixture(scope="module")
def base_url(app: LocalApp) -> str:
    return f"http://127.0.0.1:{app.port('web', 8000)}"


@pytest.fixture(scope="module")
def admin(base_url: str) -> Api:
    return Api(base_url).login(ADMIN_EMAIL, ADMIN_PASSWORD)


def test_every_service_of_compose_yaml_starts_and_is_ready(app: LocalApp) -> None:
    for service in app.compose.application:
        if service.name in app.compose.one_shot():
            continue
        (process,) = app.replicas(service.name)
        assert app.check_health(process).returncode == 0, service.name


def test_a_csv_converted_to_parquet_with_live_progress_downloads_the_same_rows(
    admin: Api, base_url: str
) -> None:
    data = csv_bytes(5000)
    panel = Panel(base_url)
    panel.login(ADMIN_EMAIL, ADMIN_PASSWORD)
    live = panel.live("jobs")
    try:
        uploaded = admin.upload("people.csv", data)
        assert uploaded["size"] == len(data)
        job = admin.convert(uploaded["id"], "parquet")
        assert job["state"] == "queued"
        events = live.wait_for(
            lambda event: event["id"] == job["id"] and event["state"] == "succeeded"
        )
    finally:
        live.close()
    states = [event["state"] for event in events if event["id"] == job["id"]]
    assert states[-1] == "succeeded"
    assert "running" in states

    finished = admin.job(job["id"])
    assert finished["state"] == "succeeded"
    assert finished["output"]["rows"] == 5000
    download = admin.download(job["id"])
    assert "attachment" in download.headers["Content-Disposition"]
    converted = pyarrow.parquet.read_table(io.BytesIO(download.content))
    original = pyarrow.csv.read_csv(io.BytesIO(data))
    assert converted.to_pylist() == original.to_pylist()


def test_a_members_job_is_invisible_to_another_member(admin: Api) -> None:
    admin.create_user("ann@example.com", "ann's password", "Ann")
    admin.create_user("bob@example.com", "bob's password", "Bob")
    ann = admin.login("ann@example.com", "ann's password")
    bob = admin.login("bob@example.com", "bob's password")

    uploaded = ann.upload("ann.csv", csv_bytes(10))
    job = ann.convert(uploaded["id"], "json")
    assert ann.wait_job(job["id"])["state"] == "succeeded"

    assert bob.job(job["id"], expect=(404,))
    assert job["id"] not in [item["id"] for item in bob.jobs()["items"]]
    bob.call("GET", f"/api/v1/conversions/{job['id']}/output", expect=(404,))
    bob.call(
        "POST",
        "/api/v1/conversions",
        expect=(404,),
        json={"file_id": uploaded["id"], "target_format": "csv", "options": {}},
    )
    assert job["id"] in [item["id"] for item in admin.jobs()["items"]]


def test_a_schedule_run_now_and_a_per_second_schedule_record_their_runs(
    admin: Api,
) -> None:
    nightly = admin.create_schedule(
        {
            "name": "e2e nightly purge",
            "cron": "0 3 * * *",
            "timezone": "UTC",
            "target": {
                "kind": "rpc",
                "service": "conversions",
                "method": "purge_expired",
                "kwargs": {"older_than_seconds": 86400},
            },
        }
    )
    admin.call("POST", f"/api/v1/schedules/{nightly['id']}/run", expect=(200, 202))

    every_second = admin.create_schedule(
        {
            "name": "e2e every second",
            "cron": "* * * * * *",
            "timezone": "UTC",
            "target": {"kind": "event", "event_type": "e2e_tick", "payload": {}},
        }
    )

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ran_now = [r for r in admin.runs(nightly["id"]) if r["outcome"] == "succeeded"]
        ticks = [
            r for r in admin.runs(every_second["id"]) if r["outcome"] == "succeeded"
        ]
        if ran_now and len(ticks) >= 3:
            break
        time.sleep(0.5)
    else:
        pytest.fail(
            f"runs: {admin.runs(nightly['id'])} / {admin.runs(every_second['id'])}"
        )
    # One run per second, never two for the same tick.
    fired = [run["scheduled_for"] for run in ticks]
    assert len(fired) == len(set(fired))
    admin.call("POST", f"/api/v1/schedules/{every_second['id']}/pause", expect=(200,))


def test_in_a_browser_a_csv_is_uploaded_converted_live_and_downloaded(
    base_url: str, tmp_path: Path, chromium: Any
) -> None:
    """The panel in Debian's Chromium (CI installs it; missing, the test fails)."""
    from playwright.sync_api import expect

    data = csv_bytes(800)
    context = chromium.new_context(accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(30_000)
    try:
        page.goto(base_url + "/login")
        page.get_by_label("Email").fill(ADMIN_EMAIL)
        page.get_by_label("Password").fill(ADMIN_PASSWORD)
        page.get_by_role("button", name="Log in").click()
        expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()

        page.goto(base_url + "/conversions")
        expect(page.locator("body")).to_have_attribute("data-live", "connected")
        page.set_input_files(
            "#upload-file",
            files=[{"name": "browser.csv", "mimeType": "text/csv", "buffer": data}],
        )
        page.get_by_role("button", name="Upload").click()
        page.get_by_label("Convert to").select_option("parquet")
        page.get_by_role("button", name="Start conversion").click()
        job = page.locator("#job")
        expect(job.locator('[data-field="state"]')).to_have_text("succeeded")
        job_id = job.get_attribute("data-job-id")

        page.goto(base_url + "/conversions")
        row = page.locator(f'tr[data-job-id="{job_id}"]')
        expect(row.locator('[data-field="percent"]')).to_have_text("100%")
        with page.expect_download() as download_info:
            row.get_by_role("link", name="Download").click()
        path = Path(download_info.value.path())
        table = pyarrow.parquet.read_table(io.BytesIO(path.read_bytes()))
        assert table.to_pylist() == pyarrow.csv.read_csv(io.BytesIO(data)).to_pylist()
    except Exception:
        page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
        raise
    finally:
        context.close()


# Last: it stops the application.
def test_sigterm_to_every_service_drains_requests_in_flight_without_a_5xx(
    app: LocalApp, admin: Api
) -> None:
    statuses: list[int] = []
    failures: list[str] = []
    stop = threading.Event()

    def keep_calling() -> None:
        while not stop.is_set():
            try:
                response = admin.call(
                    "GET", "/api/v1/conversions", expect=tuple(range(100, 600))
                )
                statuses.append(response.status_code)
                if response.status_code >= 500:
                    failures.append(response.text[:300])
            except requests.ConnectionError:
                # Refused once web has stopped listening: not an answer at all.
                time.sleep(0.05)

    callers = [threading.Thread(target=keep_calling) for _ in range(4)]
    for caller in callers:
        caller.start()
    # An upload streaming in when the signal arrives must still complete.
    big = csv_bytes(100_000)
    chunk = len(big) // 20 + 1
    streaming = threading.Event()

    def slow_body() -> Iterator[bytes]:
        for start in range(0, len(big), chunk):
            streaming.set()
            time.sleep(0.1)
            yield big[start : start + chunk]

    upload: dict[str, Any] = {}

    def send() -> None:
        try:
            response = admin.call(
                "POST",
                "/api/v1/files",
                expect=tuple(range(100, 600)),
                params={"name": "in-flight.csv"},
                data=slow_body(),
                headers={"Content-Type": "application/octet-stream"},
            )
            upload.update(status=response.status_code, body=response.json())
        except Exception as exc:
            upload.update(error=repr(exc))

    uploader = threading.Thread(target=send)
    uploader.start()
    assert streaming.wait(10)

    # As `docker compose stop` does: dependents first (web), then what they use.
    codes = {}
    for name in reversed(app.compose.start_order()):
        for process in app.replicas(name):
            codes[name] = app.stop(process, signal.SIGTERM, timeout=45)
        if name == "web":
            uploader.join(60)
            stop.set()
    for caller in callers:
        caller.join(30)

    assert codes and set(codes.values()) == {0}, codes
    assert statuses and all(status < 500 for status in statuses), failures
    assert upload.get("status") == 201, upload
    assert upload["body"]["size"] == len(big)
