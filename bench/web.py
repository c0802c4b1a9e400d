"""The web service under load: the conversions list (page and API) with 10,000 jobs,
and the latency from an event to the websocket frame a browser receives.

    .venv/bin/python -m bench.web [--duration 5] [--connections 10] [--sockets 100]

Runs the real users, conversions and web services as processes (``framework
run``, as deployed) on a fresh RabbitMQ vhost, with SQLite databases in a
temporary folder, or with ``--database postgresql`` fresh PostgreSQL databases
(as deployed; dropped at the end). The 10,000 jobs are written straight into the conversions
database (finished jobs, so nothing runs), since queuing that many conversions
would measure the conversions service instead.

* List: ``wrk`` (Debian's package, a C client) on keep-alive connections, with the
  admin's session cookie for the page and a bearer token for the API, on the first
  page and on a page deep in the list (server-side pagination, 20 a page).
* Events to browser: ``--sockets`` websocket clients, logged in and subscribed to
  the jobs channel; ``conversion_progress`` events are dispatched to the broker
  with the time they were sent, and each client records when its frame arrived.
  The latency is from dispatch (before the publish) to the frame's arrival.

Next to each latency, the CPU time each process spent per request (read from
``/proc`` over the window): the web, conversions and users services, and the
broker (all of RabbitMQ, so other users' traffic counts too) and, on PostgreSQL,
the server processes serving the bench's databases. On a shared machine this
moves far less with the neighbours' load than latency does.

Prints a markdown table and writes it to ``bench/results/web.md``, in the section
of the database used (the other section is kept).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import requests
import sqlalchemy
import sqlalchemy.orm
import websocket

from bench.http import free_port
from bench.processes import ROOT, child_env, die_with_parent
from bench.profiling import broker_pid, cpu_times
from framework.database import normalise_url

JOBS = 10_000
SEQUENTIAL_CALLS = 200
ADMIN_EMAIL = "bench@example.com"
ADMIN_PASSWORD = "bench admin password"
MANAGEMENT = "http://127.0.0.1:15672/api"
AUTH = ("guest", "guest")
START_TIMEOUT = 60.0
FRAMEWORK = str(Path(sys.executable).parent / "framework")
_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def create_vhost() -> str:
    vhost = "bench_web_" + uuid.uuid4().hex[:8]
    requests.put(
        f"{MANAGEMENT}/vhosts/{vhost}", auth=AUTH, timeout=10
    ).raise_for_status()
    requests.put(
        f"{MANAGEMENT}/permissions/{vhost}/guest",
        json={"configure": ".*", "write": ".*", "read": ".*"},
        auth=AUTH,
        timeout=10,
    ).raise_for_status()
    return vhost


def delete_vhost(vhost: str) -> None:
    requests.delete(f"{MANAGEMENT}/vhosts/{vhost}", auth=AUTH, timeout=30)


def migrate(name: str, url: str) -> None:
    from framework.migrations import ServiceMigrations

    ServiceMigrations.find(
        ROOT / "services" / name, config={"DATABASE_URL": url}
    ).upgrade()


def seed_jobs(url: str, count: int, owner: int) -> None:
    """``count`` finished jobs of one file, straight into the conversions database."""
    from services.conversions.models import ConversionJob, StoredFile

    engine = sqlalchemy.create_engine(normalise_url(url))
    now = datetime.now(UTC)
    with sqlalchemy.orm.Session(engine) as session, session.begin():
        file = StoredFile(
            id=str(uuid.uuid4()),
            name="seed.csv",
            size=100,
            format="csv",
            owner=owner,
            storage_key=uuid.uuid4().hex,
            created_at=now,
        )
        session.add(file)
        session.flush()
        session.bulk_insert_mappings(
            ConversionJob,  # type: ignore[arg-type]
            [
                {
                    "id": str(uuid.uuid4()),
                    "state": "succeeded",
                    "owner": owner,
                    "file_id": file.id,
                    "input_name": f"seed-{i}.csv",
                    "input_format": "csv",
                    "input_size": 100,
                    "target_format": "parquet",
                    "options": {},
                    "output_key": uuid.uuid4().hex,
                    "output_name": f"seed-{i}.parquet",
                    "output_size": 80,
                    "output_rows": 3,
                    "progress_bytes": 100,
                    "progress_rows": 3,
                    "progress_percent": 100.0,
                    "attempts": 1,
                    "created_at": now - timedelta(seconds=count - i),
                    "started_at": now - timedelta(seconds=count - i),
                    "finished_at": now - timedelta(seconds=count - i),
                }
                for i in range(count)
            ],
        )
    engine.dispose()


def vacuum_jobs(url: str) -> None:
    engine = sqlalchemy.create_engine(normalise_url(url), isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text("VACUUM ANALYZE jobs"))
    engine.dispose()


class App:
    def __init__(self, folder: Path, vhost: str, database: str = "sqlite") -> None:
        self.folder = folder
        self.vhost = vhost
        self.database = database
        self.database_urls: dict[str, str] = {}
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.amqp_uri = f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
        self.processes: list[subprocess.Popen] = []
        self.log = folder / "services.log"

    def url(self, name: str) -> str:
        if self.database == "postgresql":
            if name not in self.database_urls:
                from framework.testing.postgres import create_database

                self.database_urls[name] = create_database(f"bench_web_{name}")
            return self.database_urls[name]
        return f"sqlite:///{self.folder / name}.sqlite3"

    def drop_databases(self) -> None:
        from framework.testing.postgres import drop_database

        for url in self.database_urls.values():
            drop_database(url)

    def start(self) -> None:
        env = {
            **child_env(),
            "AMQP_URI": self.amqp_uri,
            "STORAGE_URL": str(self.folder / "storage"),
            "WEB_SERVER_ADDRESS": f"127.0.0.1:{self.port}",
            "ADMIN_EMAIL": ADMIN_EMAIL,
            "ADMIN_PASSWORD": ADMIN_PASSWORD,
            "SECRET_KEY": "bench secret key, long enough",
            "MAX_WORKERS": "50",
        }
        for name in ("users", "conversions", "web"):
            with open(self.log, "ab") as output:
                self.processes.append(
                    subprocess.Popen(
                        [
                            FRAMEWORK,
                            "run",
                            f"services.{name}.service",
                            "--config",
                            f"services/{name}/config.yaml",
                            # Each its own readiness port: the default is shared.
                            "--define",
                            f"HEALTH_SERVER_ADDRESS=127.0.0.1:{free_port()}",
                        ],
                        cwd=ROOT,
                        env={**env, "DATABASE_URL": self.url(name)},
                        stdout=output,
                        stderr=subprocess.STDOUT,
                        preexec_fn=die_with_parent,
                    )
                )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                response = requests.post(
                    self.base + "/api/v1/tokens",
                    json={
                        "email": ADMIN_EMAIL,
                        "password": ADMIN_PASSWORD,
                        "name": "bench",
                    },
                    timeout=5,
                )
                if response.status_code == 201:
                    self.token = response.json()["token"]
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                tail = self.log.read_text()[-3000:]
                raise SystemExit(f"the services did not start:\n{tail}")
            time.sleep(0.3)
        self.cookie = self.login()

    def login(self) -> str:
        session = requests.Session()
        page = session.get(self.base + "/login", timeout=10).text
        token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
        response = session.post(
            self.base + "/login",
            data={
                "email": ADMIN_EMAIL,
                "password": ADMIN_PASSWORD,
                "csrf_token": token,
            },
            allow_redirects=False,
            timeout=10,
        )
        assert response.status_code == 303, response.text
        return session.cookies["web_session"]

    def pids(self) -> dict[str, int]:
        return {
            name: process.pid
            for name, process in zip(
                ("users", "conversions", "web"), self.processes, strict=True
            )
        }

    def stop(self) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def wrk(
    url: str, header: str, connections: int, duration: float
) -> tuple[float, float, float, int]:
    """``(requests/s, p50 ms, p99 ms, requests)`` from one wrk window."""
    out = subprocess.run(
        [
            "wrk",
            f"-t{min(2, connections)}",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",
            "--latency",
            "-H",
            header,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=duration + 60,
        check=True,
    ).stdout
    if re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: .*", out):
        raise SystemExit(f"wrk saw errors:\n{out}")
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    count = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]

    def percentile(label: str) -> float:
        value, unit = re.search(label + r"%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
        return float(value) * _UNITS[unit]

    return rate, percentile("50"), percentile("99"), count


class CpuMeter:
    """CPU seconds each watched process spends over a window, per request.

    With ``databases``, also the PostgreSQL server processes connected to them
    (found in ``pg_stat_activity``; one started during the window counts from 0).
    """

    def __init__(
        self, pids: dict[str, int], databases: list[str] | None = None
    ) -> None:
        self.pids = dict(pids)
        broker = broker_pid()
        if broker is not None:
            self.pids["broker"] = broker
        self.databases = list(databases or ())
        self._before: dict[str, float] = {}
        self._backends: dict[int, float] = {}

    def _backend_times(self) -> dict[int, float]:
        from framework.testing.postgres import query

        names = [url.rsplit("/", 1)[1] for url in self.databases]
        rows = query(
            self.databases[0],
            "SELECT pid FROM pg_stat_activity WHERE datname = ANY(%s)",
            names,
        )
        times = {}
        for (pid,) in rows:
            try:
                times[pid] = sum(cpu_times(pid))
            except OSError:  # ended since
                continue
        return times

    def _now(self) -> dict[str, float]:
        return {name: sum(cpu_times(pid)) for name, pid in self.pids.items()}

    def start(self) -> None:
        self._before = self._now()
        if self.databases:
            self._backends = self._backend_times()

    def per_request(self, requests: int) -> str:
        """``web 3.1 · conversions 2.0 · ...`` ms of CPU per request."""
        after = self._now()
        spent = {name: after[name] - self._before[name] for name in self.pids}
        if self.databases:
            spent["postgres"] = sum(
                seconds - self._backends.get(pid, 0.0)
                for pid, seconds in self._backend_times().items()
            )
        return " · ".join(
            f"{name} {seconds * 1000 / max(1, requests):.1f}"
            for name, seconds in spent.items()
        )


def socket_latencies(app: App, sockets: int, events: int, rate: float) -> list[float]:
    from framework.standalone.events import event_dispatcher

    received: list[float] = []
    lock = threading.Lock()
    ready = threading.Barrier(sockets + 1)
    connections = []
    for _ in range(sockets):
        ws = websocket.create_connection(
            app.base.replace("http", "ws") + "/ws",
            cookie=f"web_session={app.cookie}",
            timeout=30,
        )
        json.loads(ws.recv())  # connected
        ws.send(
            json.dumps(
                {
                    "method": "subscribe",
                    "data": {"channel": "jobs"},
                    "correlation_id": 1,
                }
            )
        )
        assert json.loads(ws.recv())["success"]
        connections.append(ws)

    def listen(ws: Any) -> None:
        ready.wait()
        got = 0
        while got < events:
            frame = json.loads(ws.recv())
            arrived = time.time()
            if frame.get("event") == "job":
                with lock:
                    received.append((arrived - frame["data"]["sent_at"]) * 1000)
                got += 1

    threads = [
        threading.Thread(target=listen, args=(ws,), daemon=True) for ws in connections
    ]
    for thread in threads:
        thread.start()
    dispatch = event_dispatcher({"AMQP_URI": app.amqp_uri})
    ready.wait()
    time.sleep(0.5)
    job = {"id": str(uuid.uuid4()), "owner": None, "state": "running"}
    for _ in range(events):
        dispatch(
            "conversions",
            "conversion_progress",
            {"job": {**job, "sent_at": time.time()}},
        )
        time.sleep(1 / rate)
    for thread in threads:
        thread.join(timeout=60)
    dispatch.close()
    for ws in connections:
        ws.close()
    return received


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def sequential(call: Any, count: int) -> tuple[float, float, float]:
    """``(calls/s, p50 ms, p99 ms)`` of ``count`` calls one after another."""
    timings = []
    started = time.perf_counter()
    for _ in range(count):
        begin = time.perf_counter()
        call()
        timings.append((time.perf_counter() - begin) * 1000)
    rate = count / (time.perf_counter() - started)
    return rate, statistics.median(timings), percentile(timings, 0.99)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--sockets", type=int, default=100)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument(
        "--event-rate", type=float, default=20.0, help="events per second"
    )
    parser.add_argument(
        "--database",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="the services' databases: SQLite files, or PostgreSQL as deployed",
    )
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is missing: apt-get install wrk", file=sys.stderr)
        return 1
    load_before = load_average()
    vhost = create_vhost()
    folder = Path(tempfile.mkdtemp(prefix="bench-web-"))
    app = App(folder, vhost, args.database)
    try:
        for name in ("users", "conversions", "web"):
            migrate(name, app.url(name))
        app.start()
        admin_id = requests.get(
            app.base + "/api/v1/users?text=bench@",
            headers={"Authorization": f"Bearer {app.token}"},
            timeout=10,
        ).json()["items"][0]["id"]
        seed_jobs(app.url("conversions"), JOBS, admin_id)
        if args.database == "postgresql":
            # What autovacuum does soon after a bulk insert: statistics, and
            # the visibility map that lets scans answer from an index alone.
            vacuum_jobs(app.url("conversions"))
        cookie = f"Cookie: web_session={app.cookie}"
        bearer = f"Authorization: Bearer {app.token}"
        rows = []
        meter = CpuMeter(app.pids(), list(app.database_urls.values()))
        deep = JOBS // 20 // 2
        for what, path, header in (
            ("list page, page 1", "/conversions", cookie),
            (f"list page, page {deep}", f"/conversions?page={deep}", cookie),
            ("list API, page 1", "/api/v1/conversions", bearer),
            (f"list API, page {deep}", f"/api/v1/conversions?page={deep}", bearer),
        ):
            wrk(app.base + path, header, args.connections, 1)  # warm up
            meter.start()
            rate, p50, p99, count = wrk(
                app.base + path, header, args.connections, args.duration
            )
            rows.append(
                f"| {what} | {rate:.0f} req/s | {p50:.1f} ms | {p99:.1f} ms | "
                f"{meter.per_request(count)} |"
            )
        # Where the time goes: the conversions service's own answer, then the same
        # through the web API, one call at a time.
        from framework.standalone.rpc import ClusterRpcProxy

        with ClusterRpcProxy({"AMQP_URI": app.amqp_uri}, timeout=30) as rpc:
            for page in (1, deep):
                meter.start()
                rate, p50, p99 = sequential(
                    lambda page=page: rpc.conversions.list_jobs(page=page, per_page=20),
                    SEQUENTIAL_CALLS,
                )
                rows.append(
                    f"| `conversions.list_jobs` RPC alone, page {page}, sequential | "
                    f"{rate:.0f} calls/s | {p50:.1f} ms | {p99:.1f} ms | "
                    f"{meter.per_request(SEQUENTIAL_CALLS)} |"
                )
        api = requests.Session()
        api.headers["Authorization"] = f"Bearer {app.token}"
        for page in (1, deep):
            meter.start()
            rate, p50, p99 = sequential(
                lambda page=page: api.get(
                    f"{app.base}/api/v1/conversions?page={page}", timeout=30
                ),
                SEQUENTIAL_CALLS,
            )
            rows.append(
                f"| list API, page {page}, sequential | {rate:.0f} req/s | {p50:.1f} ms | "
                f"{p99:.1f} ms | {meter.per_request(SEQUENTIAL_CALLS)} |"
            )
        latencies = socket_latencies(app, args.sockets, args.events, args.event_rate)
        expected = args.sockets * args.events
        rows.append(
            f"| event → websocket frame, {args.sockets} sockets ({len(latencies)}/{expected} frames) | "
            f"{args.event_rate:.0f} events/s | {statistics.median(latencies):.1f} ms | "
            f"{percentile(latencies, 0.99):.1f} ms | |"
        )
    finally:
        app.stop()
        delete_vhost(vhost)
        app.drop_databases()
        shutil.rmtree(folder, ignore_errors=True)
    load_after = load_average()
    table = "\n".join(
        [
            f"{JOBS} jobs; `python -m bench.web --duration {args.duration:g} --connections "
            f"{args.connections} --sockets {args.sockets} --database {args.database}`; "
            f"{os.cpu_count()} cores",
            "",
            f"Load average at the start: {load_before}; at the end: {load_after}",
            "",
            "| what | throughput | p50 | p99 | CPU ms per request |",
            "| --- | --- | --- | --- | --- |",
            *rows,
        ]
    )
    print(table)
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    path = results / "web.md"
    path.write_text(
        replace_section(path.read_text() if path.exists() else "", args.database, table)
    )
    return 0


SECTION_TITLES = {"sqlite": "## SQLite databases", "postgresql": "## PostgreSQL"}


def replace_section(text: str, database: str, table: str) -> str:
    """The results file with this database's section replaced, the other kept."""
    sections = {}
    for name, title in SECTION_TITLES.items():
        start = text.find(title + "\n")
        if start < 0:
            continue
        end = min(
            [
                found
                for other in SECTION_TITLES.values()
                if (found := text.find(other + "\n", start + 1)) > start
            ]
            or [len(text)]
        )
        sections[name] = text[start:end].strip()
    sections[database] = f"{SECTION_TITLES[database]}\n\n{table}"
    return (
        "\n\n".join(sections[name] for name in SECTION_TITLES if name in sections)
        + "\n"
    )


if __name__ == "__main__":
    raise SystemExit(main())
