"""Journeys through the panel in a real browser: Playwright driving Debian's
Chromium (``/usr/bin/chromium``; CI installs it, and a missing browser fails these
tests rather than skipping them), against the real users, conversions, scheduler
and web services, each run as deployed (``framework run``) on a fresh RabbitMQ
vhost, with SQLite databases and a storage folder of their own.

A screenshot of the page is kept for every failing test, under
``tests/services/web/browser-failures/`` (gitignored).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet
import pytest
import requests
from playwright.sync_api import Browser, Page, expect

import services.conversions
import services.scheduler
import services.users
import services.web
from framework.migrations import ServiceMigrations
from framework.testing.utils import find_free_port

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

PROJECT_DIR = Path(services.web.__file__).parent.parent.parent
FRAMEWORK = str(Path(sys.executable).parent / "framework")
FAILURES_DIR = Path(__file__).parent / "browser-failures"
SERVICES = {
    "users": services.users,
    "conversions": services.conversions,
    "scheduler": services.scheduler,
    "web": services.web,
}
ADMIN_EMAIL = "admin@example.com"
ADMIN_PASSWORD = "admin browser password"
START_TIMEOUT = 90.0
UPLOAD_LIMIT = 16 * 1024 * 1024
TIMEOUT_MS = 20_000
expect.set_options(timeout=TIMEOUT_MS)


class System:
    """The four services, running as processes."""

    def __init__(
        self, base_url: str, health_urls: dict[str, str], logs: Path, vhost: str
    ) -> None:
        self.vhost = vhost
        self.base_url = base_url
        self.health_urls = health_urls
        self.logs = logs

    def token(self, email: str = ADMIN_EMAIL, password: str = ADMIN_PASSWORD) -> str:
        response = requests.post(
            self.base_url + "/api/v1/tokens",
            json={"email": email, "password": password, "name": "browser tests"},
            timeout=10,
        )
        assert response.status_code == 201, response.text
        return response.json()["token"]

    def api(self, token: str) -> requests.Session:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {token}"
        return session


def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def system(
    vhost_pipeline: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    vhost = vhost_pipeline.get()
    folder = tmp_path_factory.mktemp("browser-system")
    web_port = find_free_port()
    health_ports = {name: find_free_port() for name in SERVICES}
    health_urls = {
        name: f"http://127.0.0.1:{port}/health/ready"
        for name, port in health_ports.items()
    }
    environment = {
        **os.environ,
        "AMQP_URI": f"amqp://guest:guest@127.0.0.1:5672/{vhost}",
        "STORAGE_URL": str(folder / "storage"),
        "WEB_SERVER_ADDRESS": f"127.0.0.1:{web_port}",
        "ADMIN_EMAIL": ADMIN_EMAIL,
        "ADMIN_PASSWORD": ADMIN_PASSWORD,
        "ARGON2_TIME_COST": "1",
        "ARGON2_MEMORY_COST": "8",
        "ARGON2_PARALLELISM": "1",
        "SECRET_KEY": "browser tests secret key, long enough",
        "MAX_CONCURRENT_CONVERSIONS": "1",
        "CONVERSION_HEARTBEAT_INTERVAL": "0.2",
        "UPLOAD_MAX_BYTES": str(UPLOAD_LIMIT),
    }
    processes = []
    logs = folder / "services.log"
    try:
        for name, package in SERVICES.items():
            url = f"sqlite:///{folder / name}.sqlite3"
            ServiceMigrations.find(
                Path(package.__file__).parent, config={"DATABASE_URL": url}
            ).upgrade()
            health_map = (
                "{" + ", ".join(f"{k}: {v}" for k, v in health_urls.items()) + "}"
            )
            with open(logs, "ab") as output:
                processes.append(
                    subprocess.Popen(
                        [
                            FRAMEWORK,
                            "run",
                            f"services.{name}.service",
                            "--config",
                            f"services/{name}/config.yaml",
                            "--define",
                            f"HEALTH_SERVER_ADDRESS=127.0.0.1:{health_ports[name]}",
                            "--define",
                            f"SERVICE_HEALTH_URLS={health_map}",
                        ],
                        cwd=PROJECT_DIR,
                        env={**environment, "DATABASE_URL": url},
                        stdout=output,
                        stderr=subprocess.STDOUT,
                    )
                )
        base_url = f"http://127.0.0.1:{web_port}"
        for url in health_urls.values():
            wait_until(
                lambda url=url: requests.get(url, timeout=2).status_code == 200,
                START_TIMEOUT,
                f"{url} (log: {logs})",
            )
        system = System(base_url, health_urls, logs, vhost)
        # Ready also means the users service created the admin at its start.
        wait_until(
            lambda: (
                requests.post(
                    base_url + "/api/v1/tokens",
                    json={
                        "email": ADMIN_EMAIL,
                        "password": ADMIN_PASSWORD,
                        "name": "probe",
                    },
                    timeout=5,
                ).status_code
                == 201
            ),
            START_TIMEOUT,
            "the first admin",
        )
        yield system
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        vhost_pipeline.discard(vhost)


@pytest.fixture
def browser(chromium: Browser) -> Browser:
    """The session's Chromium (tests/conftest.py); each page gets its own context."""
    return chromium


@pytest.fixture
def new_page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Any]:
    """``new_page()``: a page in a fresh browser context (its own cookies)."""
    pages: list[Page] = []
    contexts = []

    def make() -> Page:
        context = browser.new_context(
            viewport={"width": 1100, "height": 800}, accept_downloads=True
        )
        context.set_default_timeout(TIMEOUT_MS)
        contexts.append(context)
        page = context.new_page()
        pages.append(page)
        return page

    yield make
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        FAILURES_DIR.mkdir(exist_ok=True)
        for index, page in enumerate(pages):
            try:
                page.screenshot(
                    path=str(FAILURES_DIR / f"{request.node.name}-{index}.png"),
                    full_page=True,
                )
            except Exception:
                pass
    for context in contexts:
        context.close()


def log_in(
    page: Page, system: System, email: str = ADMIN_EMAIL, password: str = ADMIN_PASSWORD
) -> None:
    page.goto(system.base_url + "/login")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()


def csv_rows(count: int) -> bytes:
    lines = ["id,name,score"] + [f"{i},name {i},{i * 0.5}" for i in range(count)]
    return ("\n".join(lines) + "\n").encode()


def upload_in_page(page: Page, name: str, data: bytes) -> None:
    page.set_input_files(
        "#upload-file", files=[{"name": name, "mimeType": "text/csv", "buffer": data}]
    )
    page.get_by_role("button", name="Upload").click()
    expect(page.locator("#start-form")).to_be_visible()


# -- the journeys ---------------------------------------------------------------------------


def test_log_in_with_a_wrong_password_then_the_right_one_then_log_out(
    system: System, new_page: Any
) -> None:
    page = new_page()
    page.goto(system.base_url + "/conversions")
    expect(page).to_have_url(system.base_url + "/login?next=/conversions")
    page.get_by_label("Email").fill(ADMIN_EMAIL)
    page.get_by_label("Password").fill("not the password")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_have_text("Wrong email or password.")
    page.get_by_label("Password").fill(ADMIN_PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(system.base_url + "/conversions")
    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    page.goto(system.base_url + "/")
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()


def test_upload_a_csv_convert_it_to_parquet_live_and_download_it(
    system: System, new_page: Any
) -> None:
    watcher = new_page()
    log_in(watcher, system)
    watcher.goto(system.base_url + "/conversions")
    expect(watcher.locator("body")).to_have_attribute("data-live", "connected")
    # A marker the page would lose if it reloaded: what follows arrives live.
    watcher.evaluate("window.notReloaded = true")

    page = watcher.context.new_page()
    page.goto(system.base_url + "/conversions")
    upload_in_page(page, "people.csv", csv_rows(500))
    page.get_by_label("Convert to").select_option("parquet")
    page.get_by_role("button", name="Start conversion").click()
    expect(page.get_by_role("heading", name="Conversion of people.csv")).to_be_visible()
    job_id = page.locator("#job").get_attribute("data-job-id")

    row = watcher.locator(f'tr[data-job-id="{job_id}"]')
    expect(row.locator('[data-field="state"]')).to_have_text("succeeded")
    expect(row.locator('[data-field="percent"]')).to_have_text("100%")
    assert row.locator("progress").evaluate("node => node.value") == 100
    assert watcher.evaluate("window.notReloaded") is True

    with watcher.expect_download() as download_info:
        row.get_by_role("link", name="Download").click()
    download = download_info.value
    assert download.suggested_filename.endswith(".parquet")
    table = pyarrow.parquet.read_table(io.BytesIO(Path(download.path()).read_bytes()))
    assert table.num_rows == 500
    assert table.column_names == ["id", "name", "score"]
    assert table.column("name")[499].as_py() == "name 499"


def test_cancel_a_long_conversion(system: System, new_page: Any) -> None:
    page = new_page()
    log_in(page, system)
    page.goto(system.base_url + "/conversions")
    # XLSX is written a cell at a time: this takes many seconds.
    upload_in_page(page, "long.csv", csv_rows(400_000))
    page.get_by_label("Convert to").select_option("xlsx")
    page.get_by_role("button", name="Start conversion").click()
    state = page.locator('#job [data-field="state"]')
    expect(state).to_have_text("running")
    page.on("dialog", lambda dialog: dialog.accept())
    page.locator("#job").get_by_role("button", name="Cancel").click()
    expect(state).to_have_text("cancelled")
    expect(page.locator("#job").get_by_role("button", name="Retry")).to_be_visible()


def test_a_new_member_gets_403_on_admin_pages_and_404_on_others_jobs(
    system: System, new_page: Any
) -> None:
    admin_api = system.api(system.token())
    uploaded = admin_api.post(
        system.base_url + "/api/v1/files?name=admins.csv", data=csv_rows(3)
    )
    admins_job = admin_api.post(
        system.base_url + "/api/v1/conversions",
        json={"file_id": uploaded.json()["id"], "target_format": "json"},
    ).json()

    admin = new_page()
    log_in(admin, system)
    admin.goto(system.base_url + "/users")
    admin.get_by_role("link", name="New user").click()
    admin.get_by_label("Email").fill("newbie@example.com")
    admin.get_by_label("Initial password").fill("newbie password")
    admin.get_by_label("Name").fill("New Member")
    admin.get_by_role("button", name="Create user").click()
    expect(admin.get_by_role("heading", name="New Member")).to_be_visible()

    member = new_page()
    log_in(member, system, "newbie@example.com", "newbie password")
    expect(member.get_by_role("link", name="Users")).to_have_count(0)
    for path in ("/users", "/schedules", "/system", "/users/new"):
        response = member.goto(system.base_url + path)
        assert response is not None and response.status == 403, path
        expect(member.get_by_role("heading")).to_contain_text("403")
    response = member.goto(system.base_url + f"/conversions/{admins_job['id']}")
    assert response is not None and response.status == 404
    response = member.goto(
        system.base_url + f"/conversions/{admins_job['id']}/download"
    )
    assert response is not None and response.status == 404


def test_an_admin_resets_a_members_password_from_the_keyboard(
    system: System, new_page: Any
) -> None:
    admin_api = system.api(system.token())
    created = admin_api.post(
        system.base_url + "/api/v1/users",
        json={
            "email": "forgetful@example.com",
            "password": "forgotten password",
            "display_name": "Forgetful",
        },
    )
    assert created.status_code == 201, created.text
    member = new_page()
    log_in(member, system, "forgetful@example.com", "forgotten password")

    admin = new_page()
    log_in(admin, system)
    admin.goto(system.base_url + f"/users/{created.json()['id']}")
    admin.get_by_role("link", name="Reset password…").focus()
    admin.keyboard.press("Enter")
    expect(
        admin.get_by_role("heading", name="Reset the password of Forgetful?")
    ).to_be_visible()
    admin.get_by_label("New password", exact=True).focus()
    admin.keyboard.type("remembered password")
    admin.keyboard.press("Tab")
    assert admin.evaluate("document.activeElement.id") == "confirmation"
    admin.keyboard.type("remembered password")
    admin.keyboard.press("Enter")
    expect(
        admin.get_by_role("status").filter(has_text="Password reset.")
    ).to_be_visible()

    # The member's session ended; the new password opens a new one.
    member.goto(system.base_url + "/conversions")
    expect(member.get_by_role("button", name="Log in")).to_be_visible()
    log_in(member, system, "forgetful@example.com", "remembered password")


def test_create_a_schedule_run_it_now_and_see_the_run_appear(
    system: System, new_page: Any
) -> None:
    page = new_page()
    log_in(page, system)
    page.goto(system.base_url + "/schedules/new")
    page.get_by_label("Name").fill("user count")
    page.get_by_label("Cron expression").fill("0 3 * * *")
    page.get_by_label("Time zone").fill("Europe/Paris")
    expect(page.locator("#cron-preview li")).to_have_count(5)
    expect(page.locator("#cron-preview li").first).to_contain_text("03:00:00+01:00")
    page.get_by_label("Cron expression").fill("61 * * * *")
    expect(page.locator("#cron-preview")).to_contain_text("Invalid")
    page.get_by_label("Cron expression").fill("0 3 * * *")
    page.get_by_label("Service", exact=True).fill("users")
    page.get_by_label("Method", exact=True).fill("list_users")
    page.get_by_role("button", name="Create schedule").click()
    expect(page.get_by_role("heading", name="user count")).to_be_visible()
    expect(page.locator("#runs tr[data-run-id]")).to_have_count(0)
    expect(page.locator("body")).to_have_attribute("data-live", "connected")
    page.get_by_role("button", name="Run now").click()
    run = page.locator("#runs tr[data-run-id]")
    expect(run).to_have_count(1)
    expect(run.locator('[data-field="state"]')).to_have_text("succeeded")


def test_a_form_posted_without_its_csrf_token_is_refused(
    system: System, new_page: Any
) -> None:
    page = new_page()
    log_in(page, system)
    page.goto(system.base_url + "/users/new")
    page.evaluate("document.querySelector('main form input[name=csrf_token]').remove()")
    page.get_by_label("Email").fill("csrf@example.com")
    page.get_by_label("Initial password").fill("csrf password")
    page.get_by_label("Name").fill("Forged")
    page.get_by_role("button", name="Create user").click()
    expect(page.get_by_role("heading")).to_have_text("403 · CSRF check failed")
    page.goto(system.base_url + "/users?text=csrf")
    expect(page.locator("#users")).to_contain_text("No users found.")


def test_pages_work_from_the_keyboard_are_labelled_and_fit_a_phone(
    system: System, browser: Browser
) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    # A CSP violation (an inline script or style) shows as a console error.
    console_errors: list[str] = []
    page.on(
        "console",
        lambda m: console_errors.append(m.text) if m.type == "error" else None,
    )
    try:
        page.goto(system.base_url + "/login")
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.textContent") == "Skip to content"
        page.keyboard.press("Tab")  # the brand link
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.id") == "email"
        page.keyboard.type(ADMIN_EMAIL)
        page.keyboard.press("Tab")
        page.keyboard.type(ADMIN_PASSWORD)
        page.keyboard.press("Enter")
        expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()
        for path in (
            "/",
            "/conversions",
            "/users",
            "/users/new",
            "/users/1/password",  # the first admin's id in a fresh database
            "/schedules/new",
            "/system",
            "/tokens",
        ):
            page.goto(system.base_url + path)
            unlabelled = page.evaluate(
                """() => Array.from(document.querySelectorAll('input, select, textarea'))
                    .filter((c) => c.type !== 'hidden' && !c.closest('[hidden]'))
                    .filter((c) => c.labels.length === 0 && !c.getAttribute('aria-label'))
                    .map((c) => c.name || c.id)"""
            )
            assert unlabelled == [], (path, unlabelled)
            overflow = page.evaluate(
                "document.documentElement.scrollWidth - window.innerWidth"
            )
            assert overflow <= 0, (path, overflow)
            assert page.locator("main h1").count() == 1, path
        assert console_errors == []
    finally:
        context.close()


def test_the_system_page_shows_every_service_ready_and_the_queues(
    system: System, new_page: Any
) -> None:
    page = new_page()
    log_in(page, system)
    page.goto(system.base_url + "/system")
    services = page.locator("#services tbody tr")
    expect(services).to_have_count(4)
    for name in ("conversions", "scheduler", "users", "web"):
        expect(services.filter(has_text=name)).to_contain_text("ready")
    users_queue = page.locator("#queues tbody tr").filter(has_text="rpc-users")
    # Other tests on this machine may restart the broker's management API: the
    # page then says so (and renders); come back until it answers.
    deadline = time.monotonic() + 60
    while users_queue.count() == 0 and time.monotonic() < deadline:
        time.sleep(1)
        page.reload()
    expect(users_queue).to_have_count(1)
    assert int(users_queue.locator("td").nth(2).inner_text()) >= 1  # its consumer


def test_the_list_polls_while_its_socket_is_down_and_reconnects(
    system: System, new_page: Any
) -> None:
    page = new_page()
    # Sockets the page opens are kept, and can be refused while `blockSockets`
    # is set, as if the server were unreachable (an init script: no CSP applies).
    page.add_init_script(
        """(() => {
            const Real = window.WebSocket;
            window.openedSockets = [];
            window.blockSockets = false;
            window.WebSocket = function (url, protocols) {
                if (window.blockSockets) throw new Error("blocked by the test");
                const socket = new Real(url, protocols);
                window.openedSockets.push(socket);
                return socket;
            };
        })()"""
    )
    log_in(page, system)
    page.goto(system.base_url + "/conversions")
    expect(page.locator("body")).to_have_attribute("data-live", "connected")
    page.evaluate("window.notReloaded = true")

    page.evaluate(
        "window.blockSockets = true; window.openedSockets.forEach((s) => s.close())"
    )
    expect(page.locator("body")).to_have_attribute("data-live", "polling")
    api = system.api(system.token())
    uploaded = api.post(
        system.base_url + "/api/v1/files?name=polled.csv", data=csv_rows(5)
    )
    job = api.post(
        system.base_url + "/api/v1/conversions",
        json={"file_id": uploaded.json()["id"], "target_format": "json"},
    ).json()
    row = page.locator(f'tr[data-job-id="{job["id"]}"]')
    expect(row.locator('[data-field="state"]')).to_have_text("succeeded")
    assert page.locator("body").get_attribute("data-live") == "polling"

    page.evaluate("window.blockSockets = false")
    expect(page.locator("body")).to_have_attribute("data-live", "connected")
    assert page.evaluate("window.notReloaded") is True


def test_dead_letters_are_counted_and_replayed_from_the_system_page(
    system: System, new_page: Any, rabbit_manager: Any
) -> None:
    rabbit_manager.create_queue(system.vhost, "web-test-q", durable=True)
    rabbit_manager.create_queue(system.vhost, "web-test-q.dead-letter", durable=True)
    rabbit_manager.publish(
        system.vhost,
        "",
        "web-test-q.dead-letter",
        {"hello": "again"},
        properties={
            "headers": {
                "x-dead-letter-reason": "handler failed",
                "x-original-exchange": "",
                "x-original-routing-key": "web-test-q",
                "x-original-queue": "web-test-q",
            }
        },
    )
    page = new_page()
    log_in(page, system)
    row = page.locator("#dead-letters tbody tr").filter(has_text="web-test-q")
    # The management API's message counts lag by a few seconds.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        page.goto(system.base_url + "/system")
        if row.get_by_role("button", name="Replay").count():
            break
        time.sleep(1)
    page.on("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name="Replay").click()
    expect(page.get_by_role("status").first).to_have_text("Replayed 1 dead letters.")
    replayed = rabbit_manager.get_messages(system.vhost, "web-test-q")
    assert [json.loads(m["payload"]) for m in replayed] == [{"hello": "again"}]


def test_a_file_over_the_upload_limit_is_refused_with_a_clear_message(
    system: System, new_page: Any, tmp_path: Path
) -> None:
    huge = tmp_path / "huge.csv"
    with open(huge, "wb") as file:
        file.truncate(UPLOAD_LIMIT + 1024 * 1024)  # sparse: cheap to make
    page = new_page()
    log_in(page, system)
    page.goto(system.base_url + "/conversions")
    expect(page.get_by_text("File (up to 16.0 MB)")).to_be_visible()
    page.set_input_files("#upload-file", str(huge))
    page.get_by_role("button", name="Upload").click()
    expect(page.locator("#upload-message")).to_have_text(
        "This file is 17.0 MB; the upload limit is 16.0 MB."
    )
    expect(page.locator("#start-form")).to_be_hidden()
