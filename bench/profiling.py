"""Where the time goes: py-spy profiles of a service and its client under load.

``python -m bench --profile`` runs the RPC benchmark at concurrency 10 (tiny
payload) against each framework, records the service process and the client
process with py-spy (CPU samples only: a process waiting in epoll is not
sampled), and writes text summaries to ``bench/profiles/``.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.broker import BenchError
from bench.payloads import TINY
from bench.processes import CLIENT_TIMEOUT, ROOT
from bench.scenarios import TARGET_CALL, Bench

log = logging.getLogger(__name__)

PROFILE_DIR = Path(__file__).parent / "profiles"
PROFILE_CONCURRENCY = 10
SAMPLE_RATE = 100  # Hz; py-spy's default, low enough not to distort a 2-core box
CLIENT_HEAD_START = 2.0  # seconds for the client to connect and warm up first
TOP = 25

FRAME = re.compile(r"^(?P<function>.*) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")

PACKAGES = (
    ("/eventlet/", "eventlet"),
    ("/greenlet/", "greenlet"),
    ("/kombu/", "kombu"),
    ("/amqp/", "py-amqp"),
    ("/vine/", "vine"),
    ("/nameko/", "nameko"),
    (str(ROOT / "framework") + "/", "framework (ours)"),
    (str(ROOT / "bench") + "/", "bench"),
    ("/json/", "json"),
    ("/logging/", "logging"),
)


def py_spy() -> str:
    found = shutil.which(
        "py-spy", path=str(Path(sys.executable).parent)
    ) or shutil.which("py-spy")
    if found is None:
        raise BenchError(
            f"py-spy is not installed: {Path(sys.executable).parent / 'pip'} install py-spy"
        )
    return found


def package_of(path: str) -> str:
    for marker, name in PACKAGES:
        if marker in path:
            return name
    if "/lib/python3" in path and "site-packages" not in path:
        return "stdlib"
    return "other"


def short_path(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3.11/", str(ROOT) + "/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


@dataclass
class Summary:
    samples: int
    self_time: collections.Counter[str]
    total_time: collections.Counter[str]
    packages: collections.Counter[str]


def summarize(raw_path: Path) -> Summary:
    """Self and inclusive time per function from py-spy's ``--format raw`` output
    (one ``frame;frame;...;leaf count`` line per distinct stack)."""
    self_time: collections.Counter[str] = collections.Counter()
    total_time: collections.Counter[str] = collections.Counter()
    packages: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw_path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [describe_frame(frame) for frame in stack.split(";")]
        samples += count
        leaf_name, leaf_package = frames[-1]
        self_time[leaf_name] += count
        packages[leaf_package] += count
        for name in {name for name, _ in frames}:
            total_time[name] += count
    return Summary(samples, self_time, total_time, packages)


def describe_frame(frame: str) -> tuple[str, str]:
    match = FRAME.match(frame.strip())
    if match is None:
        return frame.strip(), "other"
    file = match.group("file")
    line = match.group("line")
    location = f"{short_path(file)}:{line}" if line else short_path(file)
    return f"{match.group('function')} ({location})", package_of(file)


def render_summary(title: str, summary: Summary, context: list[str]) -> str:
    def pct(count: int) -> str:
        return f"{100 * count / summary.samples:5.1f}%" if summary.samples else "  -  "

    lines = [title, "=" * len(title), *context, f"CPU samples: {summary.samples}", ""]
    lines += ["Self time by package", "--------------------"]
    lines += [f"{pct(count)}  {name}" for name, count in summary.packages.most_common()]
    lines += [
        "",
        f"Top {TOP} functions by self time",
        "-" * 29,
        " self   total  function",
    ]
    lines += [
        f"{pct(count)} {pct(summary.total_time[name])}  {name}"
        for name, count in summary.self_time.most_common(TOP)
    ]
    lines += [
        "",
        f"Top {TOP} functions by total (inclusive) time",
        "-" * 41,
        "total    self  function",
    ]
    lines += [
        f"{pct(count)} {pct(summary.self_time[name])}  {name}"
        for name, count in summary.total_time.most_common(TOP)
    ]
    return "\n".join(lines) + "\n"


def profile(bench: Bench, seconds: float, out_dir: Path = PROFILE_DIR) -> list[Path]:
    """Profile each framework's service and client at once; returns the summaries."""
    spy = py_spy()
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for fw in bench.order(0):
        with bench.service(fw, "BenchTarget", TARGET_CALL) as service:
            client_args = [
                str(fw.python),
                "-m",
                "bench.client",
                fw.key,
                "--amqp-uri",
                bench.amqp_uri,
                "rpc",
                "--payload",
                TINY,
                "--concurrency",
                str(PROFILE_CONCURRENCY),
                "--duration",
                str(seconds + CLIENT_HEAD_START + 2),
            ]
            client = bench.registry.start(
                client_args, f"{fw.key}-profiled-client", stdout=subprocess.PIPE
            )
            # The profile must cover steady load only, not connecting and warming up.
            time.sleep(CLIENT_HEAD_START)
            targets = {"service": service.process.pid, "client": client.pid}
            raw_paths = {
                role: bench.registry.log_dir / f"{fw.key}-{role}.pyspy.txt"
                for role in targets
            }
            spies = [
                subprocess.Popen(
                    [
                        spy,
                        "record",
                        "--pid",
                        str(pid),
                        "--duration",
                        str(int(seconds)),
                        "--rate",
                        str(SAMPLE_RATE),
                        "--function",
                        "--format",
                        "raw",
                        "--output",
                        str(raw_paths[role]),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
                for role, pid in targets.items()
            ]
            for spy_process in spies:
                _, stderr = spy_process.communicate(timeout=seconds + 60)
                if spy_process.returncode != 0:
                    raise BenchError(
                        f"py-spy failed: {stderr.decode(errors='replace').strip()}"
                    )
            stdout, _ = client.communicate(timeout=CLIENT_TIMEOUT)
            bench.registry.stop(client)
            rate = float(json.loads(stdout.decode().strip().splitlines()[-1])["rate"])
        for role, raw_path in raw_paths.items():
            process = (
                "service process (`run bench_target`)"
                if role == "service"
                else "client process (10 standalone proxies)"
            )
            title = f"{fw.label}: {process}, RPC echo, tiny payload, concurrency {PROFILE_CONCURRENCY}"
            context = [
                f"py-spy record --rate {SAMPLE_RATE} --function --format raw, {int(seconds)} s window; "
                "CPU samples only (idle green threads in epoll are not sampled).",
                f"Throughput while profiled: {rate:,.0f} calls/s (the profiler slows it down).",
            ]
            path = out_dir / f"{fw.key}-{role}-c{PROFILE_CONCURRENCY}.txt"
            path.write_text(render_summary(title, summarize(raw_path), context))
            written.append(path)
            log.info("profile written", extra={"path": str(path)})
    return written
