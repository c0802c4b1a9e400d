"""The README's first command: ``framework app``, every service in one process on
the in-memory broker and SQLite, with nothing else running. Start it, take the
printed login, convert a small file through the API (its progress live on the
websocket), download it, see a schedule fire, stop it."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.csv
import pyarrow.parquet

from framework.testing.utils import find_free_port

from .api import Api, Panel, csv_bytes
from .compose import ROOT
from .conftest import FAST_HASHING

FRAMEWORK = str(Path(sys.executable).parent / "framework")
LOGIN = re.compile(r"login:\s+(\S+) / (\S+)")
START_TIMEOUT = 120


def test_the_one_process_mode_converts_a_file_end_to_end(tmp_path: Path) -> None:
    web_port, health_port = find_free_port(), find_free_port()
    # What a fresh machine has: none of the settings that select real servers.
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.endswith(("AMQP_URI", "DATABASE_URL")) and key != "STORAGE_URL"
    }
    env.update(FAST_HASHING)
    env["WEB_SERVER_ADDRESS"] = f"127.0.0.1:{web_port}"
    env["HEALTH_SERVER_ADDRESS"] = f"127.0.0.1:{health_port}"
    env.pop("ADMIN_PASSWORD", None)
    log = tmp_path / "app.log"
    with open(log, "wb") as output:
        app = subprocess.Popen(
            [FRAMEWORK, "app", "--data-dir", str(tmp_path / "data")],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while (login := LOGIN.search(log.read_text())) is None:
            assert app.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        email, password = login.groups()
        # The generated password is kept for the next start, readable only by us.
        kept = tmp_path / "data" / "admin-password"
        assert kept.read_text().strip() == password
        assert kept.stat().st_mode & 0o077 == 0

        base_url = f"http://127.0.0.1:{web_port}"
        api = Api(base_url).login(email, password)
        panel = Panel(base_url)
        panel.login(email, password)
        live = panel.live("jobs")
        data = csv_bytes(300)
        uploaded = api.upload("small.csv", data)
        job = api.convert(uploaded["id"], "parquet")
        # Progress is live here too: the in-memory broker carries the events.
        live.wait_for(lambda e: e["id"] == job["id"] and e["state"] == "succeeded")
        live.close()
        finished = api.wait_job(job["id"], timeout=60)
        assert finished["state"] == "succeeded", finished
        converted = pyarrow.parquet.read_table(
            io.BytesIO(api.download(job["id"]).content)
        )
        assert (
            converted.to_pylist() == pyarrow.csv.read_csv(io.BytesIO(data)).to_pylist()
        )
        # Schedules fire.
        ticking = api.create_schedule(
            {
                "name": "every second",
                "cron": "* * * * * *",
                "timezone": "UTC",
                "target": {"kind": "event", "event_type": "tick", "payload": {}},
            }
        )
        deadline = time.monotonic() + 30
        while (
            len([r for r in api.runs(ticking["id"]) if r["outcome"] == "succeeded"]) < 2
        ):
            assert time.monotonic() < deadline, api.runs(ticking["id"])
            time.sleep(0.5)
        # Every service's SQLite file is in the data folder, nowhere else.
        databases = {path.stem for path in (tmp_path / "data").glob("*.sqlite3")}
        assert databases == {"users", "conversions", "scheduler", "web"}
    finally:
        app.send_signal(signal.SIGTERM)
        try:
            code = app.wait(60)
        except subprocess.TimeoutExpired:
            app.kill()
            app.wait()
            raise
    assert code == 0, log.read_text()[-5000:]
