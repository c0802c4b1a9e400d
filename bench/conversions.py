"""Benchmark: the conversions service against polars alone, on the same CSV file.

    .venv/bin/python -m bench.conversions --size-mb 200            # about two minutes
    .venv/bin/python -m bench.conversions --size-mb 1024 --batch-files 4

Generates a deterministic mixed-type CSV (ints, text with quoted commas, large
integers, floats, dates, booleans) of about ``--size-mb`` megabytes, then measures
on that one file, in one run:

* polars ``scan_csv(...).sink_parquet(...)`` alone, in a fresh process;
* the service path, ``start_conversion`` to ``succeeded``: one replica
  (``framework run``) on the real RabbitMQ (a fresh vhost) and PostgreSQL (a fresh
  database), the file in a local storage folder;
* the peak RSS of the conversion's child process, sampled from ``/proc``;
* files per minute with one and with two replicas: ``--batch-files`` jobs of a
  ``--batch-size-mb`` file queued at once, until the last one succeeds.

Prints a markdown table (progress on stderr). Needs RabbitMQ with its management
API on localhost and PostgreSQL on 127.0.0.1 (user postgres, trust), as in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PROJECT_DIR = Path(__file__).resolve().parent.parent
AMQP_SERVER = "amqp://guest:guest@127.0.0.1:5672"
RABBIT_API = "http://guest:guest@localhost:15672"
ROWS_PER_CHUNK = 200_000


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the input --------------------------------------------------------------------------


def generate_csv(path: Path, size_mb: float) -> int:
    """A deterministic CSV of about ``size_mb`` MiB; the number of rows."""
    import polars as pl

    target = int(size_mb * (1 << 20))
    rows = 0
    with open(path, "wb") as out:
        while out.tell() < target:
            chunk = (
                pl.select(i=pl.int_range(rows, rows + ROWS_PER_CHUNK, dtype=pl.Int64))
                .with_columns(h=(pl.col("i") * 2654435761 + 97) % 4294967291)
                .select(
                    id=pl.col("i"),
                    name=pl.lit("name_") + (pl.col("h") % 1000003).cast(pl.Utf8),
                    amount=(pl.col("h") * 4099) % 2_000_000_000_000 - 1_000_000_000_000,
                    ratio=(pl.col("h") % 1_000_000) / 1_000_000,
                    day=pl.lit(datetime.date(2000, 1, 1))
                    + pl.duration(days=pl.col("h") % 10000),
                    flag=(pl.col("h") % 2) == 0,
                    note=pl.lit("note, with comma ") + (pl.col("i") % 97).cast(pl.Utf8),
                )
            )
            chunk.write_csv(out, include_header=rows == 0)
            rows += ROWS_PER_CHUNK
    return rows


def input_file(folder: Path, size_mb: float) -> Path:
    path = folder / f"bench-{size_mb:g}mb.csv"
    if not path.exists():
        note(f"generating {path.name}...")
        partial = path.with_suffix(".partial")
        generate_csv(partial, size_mb)
        partial.rename(path)
    return path


# -- polars alone -----------------------------------------------------------------------

POLARS_ALONE = """
import resource, sys, time
import polars as pl
start = time.perf_counter()
pl.scan_csv(sys.argv[1]).sink_parquet(sys.argv[2])
elapsed = time.perf_counter() - start
print(elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def polars_alone(source: Path, folder: Path) -> tuple[float, int]:
    out = folder / "polars-alone.parquet"
    result = subprocess.run(
        [sys.executable, "-c", POLARS_ALONE, str(source), str(out)],
        check=True,
        capture_output=True,
        text=True,
    )
    out.unlink()
    seconds, rss = result.stdout.split()
    return float(seconds), int(rss)


# -- the service ---------------------------------------------------------------------------


@contextlib.contextmanager
def environment(folder: Path) -> Iterator[dict[str, Any]]:
    """A fresh vhost, database and storage folder; removed afterwards."""
    from framework.testing.postgres import fresh_database
    from framework.testing.rabbit import Client

    name = f"bench_conversions_{uuid.uuid4().hex[:8]}"
    rabbit = Client(RABBIT_API)
    rabbit.create_vhost(name)
    rabbit.set_vhost_permissions(name, "guest", ".*", ".*", ".*")
    storage = folder / "storage"
    storage.mkdir(exist_ok=True)
    try:
        with fresh_database(name, PROJECT_DIR / "services" / "conversions") as database:
            yield {
                "AMQP_URI": f"{AMQP_SERVER}/{name}",
                "DATABASE_URL": database,
                "STORAGE_URL": str(storage),
                "vhost": name,
                "storage": storage,
            }
    finally:
        with contextlib.suppress(Exception):
            rabbit.delete_vhost(name)
        shutil.rmtree(storage, ignore_errors=True)


@contextlib.contextmanager
def replicas(env: dict[str, Any], count: int, log: Path) -> Iterator[list[Any]]:
    variables = {
        **os.environ,
        "AMQP_URI": env["AMQP_URI"],
        "DATABASE_URL": env["DATABASE_URL"],
        "STORAGE_URL": env["STORAGE_URL"],
    }
    from framework.testing.processes import start_service, stop_processes

    processes = [
        start_service(
            "services.conversions.service",
            "services/conversions/config.yaml",
            cwd=PROJECT_DIR,
            env=variables,
            log_file=log,
        )
        for _ in range(count)
    ]
    try:
        yield processes
    finally:
        stop_processes(processes, timeout=60)


def wait_until_serving(rpc: Any, consumers: int, env: dict[str, Any]) -> None:
    from framework.exceptions import RpcTimeout, UnknownService
    from framework.testing.rabbit import Client

    rabbit = Client(RABBIT_API)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            rpc.conversions.formats()
            queue = rabbit.get_queue(env["vhost"], "conversions.jobs")
            if queue.get("consumers") == consumers:
                return
        except (UnknownService, RpcTimeout, Exception):  # noqa: BLE001 - starting
            pass
        time.sleep(0.2)
    raise RuntimeError("the replicas did not start within 120 s")


LATENCIES: list[float] = []  # seconds of each get_job call made while jobs ran


class RssWatch:
    """Peak resident memory of the replicas' child processes (the conversions)."""

    def __init__(self, parents: list[int]) -> None:
        self.parents = set(parents)
        self.peak = 0

    def sample(self) -> None:
        for pid in _descendants(self.parents):
            if pid in self.parents:
                continue
            with contextlib.suppress(OSError, ValueError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak = max(self.peak, int(line.split()[1]) * 1024)


def _descendants(roots: set[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found


def run_jobs(
    rpc: Any, file_ids: list[str], watch: RssWatch | None = None
) -> tuple[float, list[dict[str, Any]]]:
    """Queue a parquet conversion of each file; seconds until all succeeded.

    Timed by the jobs' own timestamps (the service's clock, on this machine): from
    the call to ``start_conversion`` to the last ``finished_at``. Polling only
    finds out when that was, so it can be slow and stay out of the measurement's
    way on a machine with two cores.
    """
    service = rpc.conversions
    started = datetime.datetime.now(datetime.UTC)
    jobs = [
        service.start_conversion(file_id, "parquet", {}, None) for file_id in file_ids
    ]
    pending = {job["id"] for job in jobs}
    finished = []
    while pending:
        if watch is not None:
            watch.sample()
        for job_id in list(pending):
            called = time.perf_counter()
            job = service.get_job(job_id)
            LATENCIES.append(time.perf_counter() - called)
            if job["state"] in ("succeeded", "failed", "cancelled"):
                pending.discard(job_id)
                finished.append(job)
        time.sleep(0.25)
    failed = [job for job in finished if job["state"] != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} jobs did not succeed: {failed[0]['error']}")
    last = max(datetime.datetime.fromisoformat(job["finished_at"]) for job in finished)
    return (last - started).total_seconds(), finished


def place(env: dict[str, Any], source: Path) -> str:
    """The file into the storage folder (a hard link: no copy), under a new key."""
    from framework.storage import FileStorage

    key = FileStorage.new_key(".csv")
    target = Path(env["storage"]) / key
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
    return key


def compare(
    env: dict[str, Any], source: Path, folder: Path, runs: int, log: Path
) -> tuple[list[float], list[float], int, int, list[tuple[float, float]]]:
    """Polars alone and the service path, alternating run by run.

    The machine is shared: alternating keeps a burst of someone else's load from
    landing on one side only. Returns both sides' timings and peak RSS.
    """
    from framework.standalone.rpc import ClusterRpcProxy

    config = {"AMQP_URI": env["AMQP_URI"]}
    alone, service = [], []
    alone_rss = 0
    phases: list[tuple[float, float]] = []
    with replicas(env, 1, log) as processes, ClusterRpcProxy(config, timeout=60) as rpc:
        wait_until_serving(rpc, 1, env)
        watch = RssWatch([process.pid for process in processes])
        for run in range(runs):
            note(f"run {run + 1}/{runs}: polars alone, then the service")
            seconds, alone_rss = polars_alone(source, folder)
            alone.append(seconds)
            registered = rpc.conversions.register_file(
                place(env, source), source.name, 0, None
            )
            elapsed, (job,) = run_jobs(rpc, [registered["id"]], watch)
            service.append(elapsed)
            phases.append(_phases(job))
    return alone, service, alone_rss, watch.peak, phases


def _phases(job: dict[str, Any]) -> tuple[float, float]:
    """Seconds from queued to started, and from started to finished."""
    created, started, finished = (
        datetime.datetime.fromisoformat(job[key])
        for key in ("created_at", "started_at", "finished_at")
    )
    return (started - created).total_seconds(), (finished - started).total_seconds()


def throughput(
    env: dict[str, Any], source: Path, files: int, replica_count: int, log: Path
) -> float:
    from framework.standalone.rpc import ClusterRpcProxy

    config = {"AMQP_URI": env["AMQP_URI"]}
    with (
        replicas(env, replica_count, log),
        ClusterRpcProxy(config, timeout=60) as rpc,
    ):
        wait_until_serving(rpc, replica_count, env)
        ids = [
            rpc.conversions.register_file(place(env, source), source.name, 0, None)[
                "id"
            ]
            for _ in range(files)
        ]
        elapsed, _ = run_jobs(rpc, ids)
    return files / elapsed * 60


# -- the report --------------------------------------------------------------------------


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return (
        f"{os.cpu_count()} cores ({cpu}), {memory:.0f} GiB, "
        f"Python {platform.python_version()}, load average {load}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=200, help="input size")
    parser.add_argument("--runs", type=int, default=3, help="runs of each timing")
    parser.add_argument("--batch-size-mb", type=float, default=50)
    parser.add_argument("--batch-files", type=int, default=6)
    parser.add_argument("--workdir", type=Path, default=None, help="keeps inputs")
    args = parser.parse_args()

    import polars as pl

    folder = args.workdir or Path(tempfile.mkdtemp(prefix="bench-conversions-"))
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "replicas.log"
    source = input_file(folder, args.size_mb)
    batch_source = input_file(folder, args.batch_size_mb)
    size = source.stat().st_size

    with environment(folder) as env:
        alone, service, alone_rss, child_rss, phases = compare(
            env, source, folder, args.runs, log
        )
        note("files per minute, one replica...")
        one = throughput(env, batch_source, args.batch_files, 1, log)
        note("files per minute, two replicas...")
        two = throughput(env, batch_source, args.batch_files, 2, log)

    best_alone, best_service = min(alone), min(service)
    mb = size / (1 << 20)
    rows = [
        ("input", f"{mb:,.0f} MiB CSV, 7 mixed columns"),
        (
            "polars scan_csv → sink_parquet alone",
            f"{best_alone:.2f} s ({mb / best_alone:,.0f} MiB/s); "
            f"runs {', '.join(f'{s:.2f}' for s in alone)}",
        ),
        (
            "service, start_conversion → succeeded",
            f"{best_service:.2f} s ({mb / best_service:,.0f} MiB/s); "
            f"runs {', '.join(f'{s:.2f}' for s in service)}",
        ),
        ("service speed / polars alone", f"{best_alone / best_service:.0%}"),
        (
            "service runs: queued → started, started → finished",
            "; ".join(f"{queued:.2f} s, {ran:.2f} s" for queued, ran in phases),
        ),
        (
            "RPC get_job while a conversion runs in the replica: median, max",
            f"{statistics.median(LATENCIES) * 1000:.0f} ms, "
            f"{max(LATENCIES) * 1000:.0f} ms ({len(LATENCIES)} calls)",
        ),
        ("peak RSS, polars alone", f"{alone_rss / (1 << 20):,.0f} MiB"),
        (
            "peak RSS, the conversion's child process",
            f"{child_rss / (1 << 20):,.0f} MiB",
        ),
        (
            f"files/minute, 1 replica ({args.batch_files} × "
            f"{batch_source.stat().st_size / (1 << 20):,.0f} MiB)",
            f"{one:.1f}",
        ),
        ("files/minute, 2 replicas (same files)", f"{two:.1f}"),
    ]
    print(f"\nconversions bench, {datetime.date.today()}, polars {pl.__version__}")
    print(f"machine: {machine()}\n")
    print("| measure | result |\n|---|---|")
    for label, value in rows:
        print(f"| {label} | {value} |")
    print(f"\n(median of service runs: {statistics.median(service):.2f} s)")
    if args.workdir is None:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
