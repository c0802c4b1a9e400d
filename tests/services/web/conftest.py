"""Fixtures for the web service's tests.

Unit and API tests run the web service for real (its own SQLite database, migrated
with its alembic revisions, its real HTTP server on a free port) with the real
users service beside it, all on the in-memory broker. The conversions and
scheduler services are outside the web's bounded context: ``fakes.py`` stands in
for them, answering their published contracts. The browser tests
(``test_browser.py``) run every real service instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

import services.users
import services.web
from framework.migrations import ServiceMigrations
from framework.testing.pytest import WebSession
from services.users.dependencies import PASSWORD_HASHING_CONFIG_KEY
from services.users.service import UsersService
from services.web.service import WebService

from . import fakes

WEB_DIR = Path(services.web.__file__).parent
USERS_DIR = Path(services.users.__file__).parent

ADMIN_EMAIL = "admin@example.com"
ADMIN_PASSWORD = "admin password"
# argon2 at its cheapest: the tests are about behaviour, not about hash strength.
FAST_HASHING = {"time_cost": 1, "memory_cost": 8, "parallelism": 1}
SECRET_KEY = "a test secret key, long enough"
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
_META_CSRF = re.compile(r'<meta name="csrf-token" content="([^"]*)"')


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    """Keeps each phase's report on the test item, so fixtures can tell whether
    the test failed (the browser tests keep a screenshot then)."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


def migrate(service_dir: Path, url: str) -> None:
    ServiceMigrations.find(service_dir, config={"DATABASE_URL": url}).upgrade()


@pytest.fixture
def web_db(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'web.sqlite3'}"
    migrate(WEB_DIR, url)
    return url


@pytest.fixture
def users_db(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'users.sqlite3'}"
    migrate(USERS_DIR, url)
    return url


@pytest.fixture
def web_settings(
    memory_config: dict[str, Any],
    web_config: dict[str, Any],
    web_db: str,
    tmp_path: Path,
) -> dict[str, Any]:
    """The web service's config for a test; tests may change it before ``app``."""
    return {
        **memory_config,
        **web_config,
        "DATABASE_URL": web_db,
        "STORAGE_URL": str(tmp_path / "storage"),
        "SECRET_KEY": SECRET_KEY,
        "LOGIN_MAX_FAILURES": 3,
        "LOGIN_MAX_FAILURES_PER_ADDRESS": 50,
        "UPLOAD_MAX_BYTES": 1024 * 1024,
        "SERVICE_HEALTH_URLS": {},
        # Nothing listens there: the system page must say so, not fail.
        "RABBIT_MANAGEMENT_URL": "http://guest:guest@127.0.0.1:9",
    }


@dataclass
class App:
    base_url: str
    web: Any  # the web container
    users: Any
    conversions: Any
    scheduler: Any
    config: dict[str, Any]

    def session(self) -> Panel:
        return Panel(self.base_url)

    def admin(self) -> Panel:
        panel = self.session()
        panel.login(ADMIN_EMAIL, ADMIN_PASSWORD)
        return panel

    def token(self, email: str = ADMIN_EMAIL, password: str = ADMIN_PASSWORD) -> str:
        response = requests.post(
            self.base_url + "/api/v1/tokens",
            json={"email": email, "password": password, "name": "tests"},
            timeout=10,
        )
        assert response.status_code == 201, response.text
        return response.json()["token"]

    def api(self, token: str | None = None) -> WebSession:
        session = WebSession(self.base_url + "/")
        if token:
            session.headers["Authorization"] = f"Bearer {token}"
        return session

    def create_member(
        self, email: str = "member@example.com", password: str = "member password"
    ) -> dict[str, Any]:
        response = self.api(self.token()).post(
            "/api/v1/users",
            json={"email": email, "password": password, "display_name": "Member"},
        )
        assert response.status_code == 201, response.text
        return response.json()


class Panel(WebSession):
    """A browser-like session of the panel: cookies, CSRF tokens from the pages."""

    def __init__(self, base_url: str) -> None:
        super().__init__(base_url + "/")
        self.csrf = ""

    def login(
        self, email: str, password: str, next_url: str = "/"
    ) -> requests.Response:
        page = self.get(f"/login?next={next_url}")
        token = _CSRF.search(page.text).group(1)
        response = self.post(
            "/login",
            data={
                "email": email,
                "password": password,
                "csrf_token": token,
                "next": next_url,
            },
            allow_redirects=False,
        )
        if response.status_code == 303:
            self.refresh_csrf()
        return response

    def refresh_csrf(self) -> str:
        page = self.get("/tokens")
        match = _META_CSRF.search(page.text)
        self.csrf = match.group(1) if match else ""
        return self.csrf

    def submit(
        self, url: str, data: dict[str, Any] | None = None, **kwargs: Any
    ) -> requests.Response:
        """A form post with the CSRF token, as the pages send it."""
        kwargs.setdefault("allow_redirects", False)
        return self.post(url, data={"csrf_token": self.csrf, **(data or {})}, **kwargs)


@pytest.fixture
def app(
    container_factory: Any,
    memory_config: dict[str, Any],
    users_db: str,
    web_settings: dict[str, Any],
) -> Iterator[App]:
    fakes.reset()
    users_config = {
        **memory_config,
        "DATABASE_URL": users_db,
        "ADMIN_EMAIL": ADMIN_EMAIL,
        "ADMIN_PASSWORD": ADMIN_PASSWORD,
        PASSWORD_HASHING_CONFIG_KEY: FAST_HASHING,
    }
    users = container_factory(UsersService, users_config)
    conversions = container_factory(fakes.FakeConversions, dict(memory_config))
    scheduler = container_factory(fakes.FakeScheduler, dict(memory_config))
    web = container_factory(WebService, web_settings)
    for container in (users, conversions, scheduler, web):
        container.start()
    address = web_settings["WEB_SERVER_ADDRESS"]
    yield App(f"http://{address}", web, users, conversions, scheduler, web_settings)
    fakes.reset()
