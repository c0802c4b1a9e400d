"""Where the time goes: py-spy profiles of a service and its client under load.

``python -m bench --profile`` runs the RPC benchmark at concurrency 10 (tiny
payload) against each framework, records the service process and the client
process with py-spy (in two modes, see ``MODES``), measures the CPU time of
service, client and broker from /proc, and writes text summaries to
``bench/profiles/``.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.broker import BenchError
from bench.payloads import TINY
from bench.processes import CLIENT_TIMEOUT, OURS, ROOT, Framework, raw_server
from bench.report import RAW, code_version
from bench.scenarios import (
    CONFIRM_LABELS,
    RAW_PREFETCH,
    TARGET_CALL,
    Bench,
    as_options,
    ceiling_mode,
)

log = logging.getLogger(__name__)

PROFILE_DIR = Path(__file__).parent / "profiles"
PROFILE_CONCURRENCY = 10
SAMPLE_RATE = 100  # Hz; py-spy's default, low enough not to distort a 2-core box
CLIENT_HEAD_START = 2.0  # seconds for the client to connect and warm up first
TOP = 25

FRAME = re.compile(r"^(?P<function>.*) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")

# py-spy shortens paths to what follows site-packages, the stdlib directory or the
# working directory, so a frame's package is the first component of its path.
PACKAGES = {
    "eventlet": "eventlet",
    "greenlet": "greenlet",
    "kombu": "kombu",
    "amqp": "py-amqp",
    "vine": "vine",
    "nameko": "nameko",
    "framework": "framework (ours)",
    "bench": "bench",
}


def py_spy() -> str:
    here = str(Path(sys.executable).parent)
    found = shutil.which("py-spy", path=here) or shutil.which("py-spy")
    if found is None:
        raise BenchError(f"py-spy is not installed: {here}/pip install py-spy")
    return found


def package_of(path: str) -> str:
    for marker, name in PACKAGES.items():
        if path.startswith(marker + "/") or f"/site-packages/{marker}/" in path:
            return name
    if "site-packages" in path:
        return "other"
    return "stdlib"


# What a sample's innermost frame was doing, in groups a reader can act on. The
# first group whose marker occurs in the frame ("function (file:line)") wins;
# anything else is counted under its package.
ACTIVITIES = (
    (
        "timers (eventlet timers and timeouts, py-amqp having_timeout)",
        ("eventlet/hubs/timer.py", "schedule_call_global", "add_timer", "fire_timers")
        + ("eventlet/timeout.py", "having_timeout"),
    ),
    (
        "AMQP frame encoding (py-amqp frame_writer, property/table encoding)",
        ("frame_writer", "_serialize_properties", "_write_table", "_flushbits")
        + ("dumps (amqp/serialization.py", "_write_item"),
    ),
    (
        "AMQP frame decoding and dispatch (py-amqp)",
        ("read_frame", "frame_handler", "loads (amqp/serialization.py", "decode_")
        + ("dispatch_method", "on_inbound", "_on_basic_", "_read_table", "_read_item"),
    ),
    (
        "socket reads and writes (py-amqp transport, eventlet greenio)",
        ("amqp/transport.py", "eventlet/greenio/"),
    ),
    (
        "green-thread scheduling (eventlet hub, spawn, switch, events, locks)",
        ("eventlet/hubs/", "eventlet/greenthread.py", "eventlet/event.py")
        + ("eventlet/semaphore.py", "eventlet/queue.py", "eventlet/greenpool.py"),
    ),
    (
        "JSON encoding and decoding",
        ("json/", "kombu/serialization.py", "kombu/utils/json"),
    ),
    ("ids (uuid)", ("uuid",)),
)


def activity_of(frame: str, package: str) -> str:
    for name, markers in ACTIVITIES:
        if any(marker in frame for marker in markers):
            return name
    return f"other {package}"


@dataclass
class Summary:
    samples: int
    self_time: collections.Counter[str]
    total_time: collections.Counter[str]
    packages: collections.Counter[str]
    activities: collections.Counter[str]


def summarize(raw_path: Path) -> Summary:
    """Self and inclusive time per function from py-spy's ``--format raw`` output
    (one ``frame;frame;...;leaf count`` line per distinct stack)."""
    self_time: collections.Counter[str] = collections.Counter()
    total_time: collections.Counter[str] = collections.Counter()
    packages: collections.Counter[str] = collections.Counter()
    activities: collections.Counter[str] = collections.Counter()
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
        activities[activity_of(leaf_name, leaf_package)] += count
        for name in {name for name, _ in frames}:
            total_time[name] += count
    return Summary(samples, self_time, total_time, packages, activities)


def describe_frame(frame: str) -> tuple[str, str]:
    match = FRAME.match(frame.strip())
    if match is None:
        return frame.strip(), "other"
    file = match.group("file")
    line = match.group("line")
    location = f"{file}:{line}" if line else file
    return f"{match.group('function')} ({location})", package_of(file)


# py-spy's sampling modes, each recorded in a window of its own (a process can
# have only one tracer at a time).
MODES = {
    "gil": (
        ["--gil"],
        "only the thread holding the GIL is sampled: pure Python-level CPU. Time in "
        "system calls that release the GIL (socket send/recv, epoll) is not counted; "
        "the system CPU time above shows how much that is.",
    ),
    "active": (
        [],
        "py-spy's default: every thread it considers running, system calls included. "
        "Its idle detection is a heuristic: a thread just woken from epoll (or a "
        "sleeping heartbeat thread) may be counted as busy, so read it next to the "
        "GIL profile.",
    ),
}


@dataclass
class CpuUsage:
    """CPU time a process used over a window, in cores (1.0 = one core busy)."""

    user: float
    system: float

    @property
    def total(self) -> float:
        return self.user + self.system


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid`` so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    # Counting from the state (field 3), utime and stime are fields 14 and 15.
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def broker_pid() -> int | None:
    """The local RabbitMQ's Erlang VM, to show the broker's share of the CPU."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "beam.smp":
                    return int(entry.name)
            except OSError:
                continue
    return None


BROKER = "broker (all of RabbitMQ, other users' traffic included)"


def measure_cpu(
    pids: dict[str, int], during: Callable[[], None]
) -> dict[str, CpuUsage]:
    """CPU each of ``pids`` (and the broker) used while ``during()`` ran."""
    watched = dict(pids)
    broker = broker_pid()
    if broker is not None:
        watched[BROKER] = broker
    before = {role: cpu_times(pid) for role, pid in watched.items()}
    started = time.monotonic()
    during()
    elapsed = time.monotonic() - started
    usage = {}
    for role, pid in watched.items():
        user, system = cpu_times(pid)
        usage[role] = CpuUsage(
            (user - before[role][0]) / elapsed, (system - before[role][1]) / elapsed
        )
    return usage


def record(
    spy: str,
    targets: dict[str, int],
    mode: str,
    seconds: int,
    raw_dir: Path,
    prefix: str,
) -> dict[str, Path]:
    """py-spy on every target at once, for ``seconds``; the raw output files."""
    raw_paths = {
        role: raw_dir / f"{prefix}-{role}-{mode}.pyspy.txt" for role in targets
    }
    spies = [
        subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--duration", str(seconds)]
            + ["--rate", str(SAMPLE_RATE), "--function", "--format", "raw"]
            + [*MODES[mode][0], "--output", str(raw_paths[role])],
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
    return raw_paths


@dataclass
class Profile:
    """One framework under load: its CPU budget and its py-spy samples."""

    rate: float
    cpu: dict[str, CpuUsage]
    raw_paths: dict[str, dict[str, Path]]  # mode -> role -> py-spy output


def start_load(bench: Bench, fw: Framework, duration: float, name: str) -> Any:
    options = {
        "payload": TINY,
        "concurrency": PROFILE_CONCURRENCY,
        "duration": duration,
    }
    return bench.registry.start(
        [str(fw.python), "-m", "bench.client", fw.key]
        + ["--amqp-uri", bench.uris[fw.key], "rpc", *as_options(options)],
        name,
        stdout=subprocess.PIPE,
    )


def finish_load(bench: Bench, client: Any) -> float:
    stdout, _ = client.communicate(timeout=CLIENT_TIMEOUT)
    bench.registry.stop(client)
    return float(json.loads(stdout.decode().strip().splitlines()[-1])["rate"])


def profile_framework(bench: Bench, fw: Framework, spy: str, seconds: int) -> Profile:
    with bench.service(fw, "BenchTarget", TARGET_CALL, 0) as service:
        # First without any profiler: what each process costs per call. The client
        # measures over its whole run, which covers the CPU window.
        client = start_load(
            bench, fw, CLIENT_HEAD_START + seconds + 1, f"{fw.key}-load"
        )
        time.sleep(CLIENT_HEAD_START)  # connect and warm up before the window
        targets = {"service": service.process.pid, "client": client.pid}
        cpu = measure_cpu(targets, lambda: time.sleep(seconds))
        rate = finish_load(bench, client)
        # Then the samples, one window per mode, under the same load.
        duration = CLIENT_HEAD_START + len(MODES) * (seconds + 2) + 5
        client = start_load(bench, fw, duration, f"{fw.key}-profiled-load")
        time.sleep(CLIENT_HEAD_START)
        targets = {"service": service.process.pid, "client": client.pid}
        log_dir = bench.registry.log_dir
        raw_paths = {
            mode: record(spy, targets, mode, seconds, log_dir, fw.key) for mode in MODES
        }
        finish_load(bench, client)
    return Profile(rate, cpu, raw_paths)


def profile_raw(bench: Bench, seconds: int) -> tuple[float, dict[str, CpuUsage]]:
    """The CPU budget of the raw loop at the same concurrency, for comparison:
    what the broker costs per call with nothing in the way."""
    uri = bench.uris[RAW]
    confirms = ceiling_mode(PROFILE_CONCURRENCY)
    with raw_server(bench.registry, uri, confirms, RAW_PREFETCH) as server:
        options = {
            "amqp-uri": uri,
            "confirms": confirms,
            "payload": TINY,
            "concurrency": PROFILE_CONCURRENCY,
            "warmup": CLIENT_HEAD_START,
            "duration": seconds,
        }
        client = bench.registry.start(
            [str(bench.frameworks[OURS].python), "-m", "bench.raw", "client"]
            + as_options(options),
            "raw-profiled-client",
            stdout=subprocess.PIPE,
        )
        time.sleep(CLIENT_HEAD_START)
        targets = {"raw server": server.pid, "raw client": client.pid}
        cpu = measure_cpu(targets, lambda: time.sleep(seconds))
        rate = finish_load(bench, client)
    return rate, cpu


def render_cpu_table(rate: float, cpu: dict[str, CpuUsage]) -> list[str]:
    lines = [" cores   user    sys   CPU per call  process"]
    for name, usage in cpu.items():
        per_call = usage.total / rate * 1e6 if rate else float("nan")
        lines.append(
            f"{usage.total:6.2f} {usage.user:6.2f} {usage.system:6.2f} "
            f"{per_call:9.0f} us  {name}"
        )
    return lines


def render_profile(fw: Framework, role: str, result: Profile, seconds: int) -> str:
    what = (
        "service process (`run bench.services_*:BenchTarget`)"
        if role == "service"
        else f"client process ({PROFILE_CONCURRENCY} standalone proxies)"
    )
    title = (
        f"{fw.label}: {what}; RPC echo, tiny payload, concurrency {PROFILE_CONCURRENCY}"
    )
    lines = [
        title,
        "=" * len(title),
        f"Commit {code_version(ROOT)}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"Throughput without profiler: {result.rate:,.0f} calls/s. CPU over a {seconds} s",
        "window of that run (from /proc; cores = CPU seconds per second):",
        "",
        *render_cpu_table(result.rate, result.cpu),
    ]
    lines += [
        "",
        f"py-spy record --rate {SAMPLE_RATE} --function --format raw, one {seconds} s",
        "window per mode, under the same load (py-spy pauses the process at each",
        "sample, which slows it down a little).",
        "",
    ]
    for mode, raw_paths in result.raw_paths.items():
        lines += render_summary(mode, MODES[mode][1], summarize(raw_paths[role]))
    return "\n".join(lines) + "\n"


def render_summary(mode: str, meaning: str, summary: Summary) -> list[str]:
    def pct(count: int) -> str:
        if not summary.samples:
            return "  -  "
        return f"{100 * count / summary.samples:5.1f}%"

    heading = f"py-spy, {mode} mode: {summary.samples} samples"
    lines = [heading, "-" * len(heading), *textwrap.wrap(meaning, 88), ""]
    lines += ["Self time by package:"]
    lines += [f"{pct(count)}  {name}" for name, count in summary.packages.most_common()]
    lines += ["", "Self time by activity (of the innermost frame):"]
    lines += [
        f"{pct(count)}  {name}" for name, count in summary.activities.most_common()
    ]
    lines += ["", f"Top {TOP} functions by self time:", " self   total  function"]
    lines += [
        f"{pct(count)} {pct(summary.total_time[name])}  {name}"
        for name, count in summary.self_time.most_common(TOP)
    ]
    lines += [
        "",
        f"Top {TOP} functions by total (inclusive) time:",
        "total    self  function",
    ]
    lines += [
        f"{pct(count)} {pct(summary.self_time[name])}  {name}"
        for name, count in summary.total_time.most_common(TOP)
    ]
    return lines + ["", ""]


def profile(bench: Bench, seconds: float, out_dir: Path = PROFILE_DIR) -> list[Path]:
    """Profile each framework's service and client under load; returns the files."""
    spy = py_spy()
    window = max(1, int(seconds))
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for fw in bench.order(0):
        result = profile_framework(bench, fw, spy, window)
        for role in ("service", "client"):
            path = out_dir / f"{fw.key}-{role}-c{PROFILE_CONCURRENCY}.txt"
            path.write_text(render_profile(fw, role, result, window))
            written.append(path)
            log.info("profile written to %s", path)
    rate, cpu = profile_raw(bench, window)
    title = (
        f"raw py-amqp loop ({CONFIRM_LABELS[ceiling_mode(PROFILE_CONCURRENCY)]}), "
        f"tiny payload, {PROFILE_CONCURRENCY} in flight: the CPU budget of a call "
        "with no framework"
    )
    text = [
        title,
        "=" * len(title),
        f"Commit {code_version(ROOT)}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"Throughput: {rate:,.0f} calls/s. CPU over a {window} s window (from /proc):",
        "",
        *render_cpu_table(rate, cpu),
    ]
    path = out_dir / f"raw-c{PROFILE_CONCURRENCY}.txt"
    path.write_text("\n".join(text) + "\n")
    written.append(path)
    return written
