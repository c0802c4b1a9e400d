"""``python -m bench.app_load``: the whole application under N simulated users.

Starts the application as compose.yaml describes it, one local process per
service on the machine's RabbitMQ and PostgreSQL (tests/e2e/compose.py: a fresh
vhost and database set, removed afterwards), unless ``--url`` points at a
running one. The admin creates N member accounts; then each simulated user, for
``--duration`` seconds, logs in (a token) and goes round the journey: upload a
CSV, convert it to Parquet, follow its progress until it finishes, download the
output and check its size (``--relogin``: log in again before every journey). Prints conversions per minute, the API's latency
(p50/p99 per call and overall) and the errors, which must be zero.

    .venv/bin/python -m bench.app_load                     # 20 users, 60 s
    .venv/bin/python -m bench.app_load --users 50 --duration 120 --replicas 2
    .venv/bin/python -m bench.app_load --url http://127.0.0.1:8000 \\
        --admin-password "$ADMIN_PASSWORD"

Logins use the users service's real argon2 cost (compose's settings), tens of
milliseconds of CPU each: with ``--relogin`` on two cores they dominate.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.e2e.api import Api, csv_bytes  # noqa: E402
from tests.e2e.compose import Compose, LocalApp  # noqa: E402

ADMIN_EMAIL = "admin@example.com"  # compose.yaml's development defaults
ADMIN_PASSWORD = "admin-dev-password"
PG_SERVER = "postgresql://postgres@127.0.0.1:5432"
AMQP_SERVER = "amqp://guest:guest@127.0.0.1:5672"
MANAGEMENT_API = "http://guest:guest@127.0.0.1:15672"
POLL_INTERVAL = 0.25  # seconds between progress checks, as the panel's fallback
# A path segment that is an id (a job's UUID, a user's int), folded into {id}.
_ID = re.compile(
    r"(?<=/)(?:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|\d+)(?=/|$)"
)


class Recorder:
    """Latency per call (path ids folded into ``{id}``), errors, completions."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.errors: list[str] = []
        self.completed = 0

    def response(self, call: str, response: requests.Response, seconds: float) -> None:
        method, _, url = call.partition(" ")
        name = f"{method} {_ID.sub('{id}', url.split('?')[0])}"
        with self.lock:
            self.latencies[name].append(seconds)
            if response.status_code >= 400:
                self.errors.append(f"{name} -> {response.status_code}")

    def error(self, text: str) -> None:
        with self.lock:
            self.errors.append(text)


def log_in(base_url: str, email: str, password: str, recorder: Recorder) -> Api:
    anonymous = Api(base_url, on_response=recorder.response)
    return anonymous.login(email, password, name="bench")


def one_journey(user: Api, data: bytes, recorder: Recorder) -> None:
    uploaded = user.upload("load.csv", data)
    job = user.convert(uploaded["id"], "parquet")
    while job["state"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(POLL_INTERVAL)
        job = user.job(job["id"])
    if job["state"] != "succeeded":
        recorder.error(f"job {job['id']} ended {job['state']}: {job.get('error')}")
        return
    output = user.download(job["id"])
    if len(output.content) != job["output"]["size"]:
        recorder.error(f"job {job['id']}: downloaded {len(output.content)} bytes")
        return
    with recorder.lock:
        recorder.completed += 1


def simulated_user(
    base_url: str,
    email: str,
    password: str,
    data: bytes,
    deadline: float,
    recorder: Recorder,
    relogin: bool,
) -> None:
    user: Api | None = None
    while time.monotonic() < deadline:
        try:
            if user is None or relogin:
                user = log_in(base_url, email, password, recorder)
            one_journey(user, data, recorder)
        except Exception as exc:  # counted, and the user carries on
            recorder.error(f"{type(exc).__name__}: {str(exc)[:200]}")
            time.sleep(1)


@contextmanager
def processes_mode(replicas: int) -> Iterator[str]:
    """The application from compose.yaml as local processes; yields its URL."""
    from framework.testing.rabbit import Client

    management = Client(MANAGEMENT_API)
    vhost = f"bench_app_{uuid.uuid4().hex[:8]}"
    management.create_vhost(vhost)
    management.set_vhost_permissions(vhost, "guest", ".*", ".*", ".*")
    with tempfile.TemporaryDirectory(prefix="bench-app-") as workdir:
        app = LocalApp(
            compose=Compose(env={}),
            amqp_uri=f"{AMQP_SERVER}/{vhost}",
            postgres_server=PG_SERVER,
            db_prefix=f"bench_{uuid.uuid4().hex[:8]}",
            workdir=Path(workdir),
        )
        app.create_databases()
        try:
            app.up()
            for _ in range(replicas - 1):
                app.wait_healthy(app.start("conversions"))
            yield f"http://127.0.0.1:{app.port('web', 8000)}"
        finally:
            app.down()
            app.drop_databases()
            management.delete_vhost(vhost)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def report(
    recorder: Recorder, args: argparse.Namespace, elapsed: float, size: int
) -> str:
    lines = [
        f"{args.users} users, {elapsed:.0f} s, a {args.rows}-row CSV ({size / 1024:.0f} KiB) "
        f"to Parquet, {args.replicas} conversions replica(s), "
        f"{'a login per journey' if args.relogin else 'one login per user'}",
        f"conversions completed: {recorder.completed} "
        f"({recorder.completed / elapsed * 60:.1f} per minute)",
        "",
        f"{'API call':<42} {'calls':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}",
    ]
    everything: list[float] = []
    for name, values in sorted(recorder.latencies.items()):
        everything.extend(values)
        lines.append(
            f"{name:<42} {len(values):>6} {statistics.median(values) * 1000:>8.1f} "
            f"{percentile(values, 0.99) * 1000:>8.1f} {max(values) * 1000:>8.1f}"
        )
    if everything:
        lines.append(
            f"{'all':<42} {len(everything):>6} {statistics.median(everything) * 1000:>8.1f} "
            f"{percentile(everything, 0.99) * 1000:>8.1f} {max(everything) * 1000:>8.1f}"
        )
    lines += ["", f"errors: {len(recorder.errors)}"]
    lines += [f"  {error}" for error in recorder.errors[:20]]
    return "\n".join(lines)


def run(base_url: str, args: argparse.Namespace) -> int:
    admin = Api(base_url).login(
        args.admin_email, args.admin_password, name="bench admin"
    )
    run_id = uuid.uuid4().hex[:6]
    password = "bench user password"
    emails = [f"load-{run_id}-{n}@example.com" for n in range(args.users)]
    for number, email in enumerate(emails):
        admin.create_user(email, password, f"Load user {number}")
    data = csv_bytes(args.rows)

    recorder = Recorder()
    started = time.monotonic()
    deadline = started + args.duration
    users = [
        threading.Thread(
            target=simulated_user,
            args=(base_url, email, password, data, deadline, recorder, args.relogin),
        )
        for email in emails
    ]
    for user in users:
        user.start()
    for user in users:
        user.join()
    elapsed = time.monotonic() - started
    print(report(recorder, args, elapsed, len(data)))
    return 1 if recorder.errors else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.app_load", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--users", type=int, default=20, help="simulated users (default 20)"
    )
    parser.add_argument(
        "--duration", type=float, default=60, help="seconds (default 60)"
    )
    parser.add_argument(
        "--rows", type=int, default=2000, help="rows of each CSV (default 2000)"
    )
    parser.add_argument(
        "--replicas", type=int, default=1, help="conversions replicas (default 1)"
    )
    parser.add_argument(
        "--relogin",
        action="store_true",
        help="log in (a new token, an argon2 verification) before every journey "
        "instead of once per user",
    )
    parser.add_argument("--url", help="a running application instead of starting one")
    parser.add_argument("--admin-email", default=ADMIN_EMAIL)
    parser.add_argument("--admin-password", default=ADMIN_PASSWORD)
    args = parser.parse_args(argv)
    if args.url:
        return run(args.url.rstrip("/"), args)
    with processes_mode(args.replicas) as base_url:
        return run(base_url, args)


if __name__ == "__main__":
    sys.exit(main())
