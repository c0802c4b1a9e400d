"""The web service's public interface, as a script or a browser uses it.

``Api`` speaks ``/api/v1`` with a bearer token (plain ``requests``, no eventlet);
``Panel`` logs in through the login form, which is what the websocket
authenticates with; ``LiveSocket`` subscribes to a channel of ``/ws`` and reads
the events pushed to it. Shared by tests/e2e and bench/app_load.py.
"""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Callable
from typing import Any

import requests
import websocket

TERMINAL_STATES = ("succeeded", "failed", "cancelled")
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


class ApiError(Exception):
    def __init__(self, response: requests.Response) -> None:
        self.status = response.status_code
        self.body = response.text[:2000]
        super().__init__(
            f"{response.request.method} {response.url} -> {self.status}: {self.body}"
        )


class Api:
    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        timeout: float = 30,
        on_response: Callable[[str, requests.Response, float], None] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = requests.Session()
        self.timeout = timeout
        self.on_response = on_response
        if token:
            self.http.headers["Authorization"] = f"Bearer {token}"

    def call(
        self, method: str, path: str, expect: tuple[int, ...] = (200,), **kwargs: Any
    ) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        started = time.perf_counter()
        response = self.http.request(method, self.base_url + path, **kwargs)
        if self.on_response is not None:
            self.on_response(
                f"{method} {path}", response, time.perf_counter() - started
            )
        if response.status_code not in expect:
            raise ApiError(response)
        return response

    # -- accounts -----------------------------------------------------------------

    def login(self, email: str, password: str, name: str = "e2e") -> Api:
        """A new client holding a personal token of ``email``."""
        response = self.call(
            "POST",
            "/api/v1/tokens",
            expect=(201,),
            json={"email": email, "password": password, "name": name},
        )
        return Api(
            self.base_url, response.json()["token"], self.timeout, self.on_response
        )

    def create_user(
        self, email: str, password: str, display_name: str, role: str = "member"
    ) -> dict[str, Any]:
        return self.call(
            "POST",
            "/api/v1/users",
            expect=(201,),
            json={
                "email": email,
                "password": password,
                "display_name": display_name,
                "role": role,
            },
        ).json()

    # -- files and conversions ------------------------------------------------------

    def upload(self, name: str, data: bytes) -> dict[str, Any]:
        return self.call(
            "POST",
            "/api/v1/files",
            expect=(201,),
            params={"name": name},
            data=data,
            headers={"Content-Type": "application/octet-stream"},
        ).json()

    def convert(
        self, file_id: str, target_format: str, options: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return self.call(
            "POST",
            "/api/v1/conversions",
            expect=(202,),
            json={
                "file_id": file_id,
                "target_format": target_format,
                "options": options or {},
            },
        ).json()

    def job(self, job_id: str, expect: tuple[int, ...] = (200,)) -> dict[str, Any]:
        return self.call("GET", f"/api/v1/conversions/{job_id}", expect=expect).json()

    def jobs(self, **params: Any) -> dict[str, Any]:
        return self.call("GET", "/api/v1/conversions", params=params).json()

    def wait_job(
        self, job_id: str, timeout: float = 60, interval: float = 0.2
    ) -> dict[str, Any]:
        """Poll until the job reaches a terminal state; fail at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["state"] in TERMINAL_STATES:
                return job
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"job {job_id} still {job['state']} after {timeout}s: {job}"
                )
            time.sleep(interval)

    def download(self, job_id: str) -> requests.Response:
        return self.call("GET", f"/api/v1/conversions/{job_id}/output")

    # -- schedules ------------------------------------------------------------------

    def create_schedule(self, schedule: dict[str, Any]) -> dict[str, Any]:
        return self.call(
            "POST", "/api/v1/schedules", expect=(201,), json=schedule
        ).json()

    def runs(self, schedule_id: int) -> list[dict[str, Any]]:
        return self.call(
            "GET", f"/api/v1/schedules/{schedule_id}/runs", params={"per_page": 100}
        ).json()["items"]


class Panel:
    """A logged-in panel session (cookies), for what the browser does: the websocket."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = requests.Session()

    def login(self, email: str, password: str) -> None:
        page = self.http.get(self.base_url + "/login", timeout=10)
        match = _CSRF.search(page.text)
        assert match is not None, page.text[:500]
        response = self.http.post(
            self.base_url + "/login",
            data={
                "email": email,
                "password": password,
                "csrf_token": match.group(1),
                "next": "/",
            },
            allow_redirects=False,
            timeout=10,
        )
        assert response.status_code == 303, response.text[:500]

    def live(self, channel: str, timeout: float = 30) -> LiveSocket:
        cookies = "; ".join(
            f"{name}={value}" for name, value in self.http.cookies.items()
        )
        url = self.base_url.replace("http://", "ws://", 1) + "/ws"
        return LiveSocket(url, cookies, channel, timeout, origin=self.base_url)


class LiveSocket:
    """``/ws`` subscribed to ``channel``; ``events()`` yields what is pushed."""

    def __init__(
        self, url: str, cookies: str, channel: str, timeout: float, origin: str
    ) -> None:
        self.timeout = timeout
        self.socket = websocket.create_connection(
            url, timeout=timeout, cookie=cookies, origin=origin
        )
        connected = self._frame()
        assert connected.get("event") == "connected", connected
        self.socket.send(
            json.dumps(
                {
                    "method": "subscribe",
                    "data": {"channel": channel},
                    "correlation_id": 1,
                }
            )
        )
        while True:
            frame = self._frame()
            if frame.get("type") == "result":
                assert frame.get("success"), frame
                break

    def _frame(self) -> dict[str, Any]:
        return json.loads(self.socket.recv())

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float | None = None
    ) -> list[dict[str, Any]]:
        """Every pushed event's data until one satisfies ``predicate`` (included)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        seen: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            self.socket.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                frame = self._frame()
            except websocket.WebSocketTimeoutException:
                break
            if frame.get("type") != "event":
                continue
            seen.append(frame.get("data"))
            if predicate(frame.get("data")):
                return seen
        raise AssertionError(f"no matching event within the deadline; got {seen}")

    def close(self) -> None:
        self.socket.close()


def csv_bytes(rows: int, start: int = 0) -> bytes:
    """A CSV with an int, a float, a quoted text with a comma and a unicode name."""
    out = io.StringIO()
    out.write("id,amount,label,name\n")
    for number in range(start, start + rows):
        out.write(f'{number},{number * 1.5},"item {number}, boxed",Zoë {number}\n')
    return out.getvalue().encode("utf-8")
