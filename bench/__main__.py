"""``python -m bench``: ours and nameko 2.14.1 side by side; prints the table.

python -m bench                      # everything, 3 runs each
python -m bench --quick --only rpc   # a fast look at one group
python -m bench --profile            # py-spy profiles into bench/profiles/
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    # ``tools.nameko_venv`` lives at the repository root, which is not a package.
    sys.path.insert(0, str(ROOT))

from bench.broker import (  # noqa: E402
    DEFAULT_BROKER_URI,
    BenchError,
    BrokerProbe,
    Vhost,
    broker_version,
    vhost_prefix,
)
from bench.processes import (  # noqa: E402
    NAMEKO,
    OURS,
    OURS_CONFIG_ENV,
    ProcessRegistry,
    check_identical_services,
    load_frameworks,
    write_service_config,
)
from bench.report import Results, describe_machine, render  # noqa: E402
from bench.scenarios import (  # noqa: E402
    GROUP_RUNNERS,
    GROUPS,
    SIDES,
    Bench,
    Settings,
    define_figures,
)

log = logging.getLogger("bench")

DEFAULT_OUTPUT = ROOT / "bench" / "results" / "latest.md"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Benchmark ours against nameko 2.14.1."
    )
    parser.add_argument(
        "--runs",
        type=int,
        help="runs per figure; each figure is their median (default 3, 1 with --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 run, 1 s windows, 1,000 events: a smoke run, not a measurement",
    )
    parser.add_argument(
        "--only",
        choices=GROUPS,
        action="append",
        help="run only this group (repeatable)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        help="seconds in each throughput window (default 3, 1 with --quick)",
    )
    parser.add_argument(
        "--concurrency",
        type=concurrency_list,
        help="comma-separated concurrencies for the RPC figures (default 1,10,50; relay 1,10)",
    )
    parser.add_argument(
        "--events",
        type=int,
        help="events per events run (default 5000, 1000 with --quick)",
    )
    parser.add_argument(
        "--broker",
        default=DEFAULT_BROKER_URI,
        help=f"RabbitMQ URI without vhost (default {DEFAULT_BROKER_URI})",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="where to write the table (default bench/results/latest.md)",
    )
    parser.add_argument(
        "--log-dir",
        type=Path,
        help="keep the logs of every process started here (default: a temporary "
        "directory, removed at the end)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile service and client at concurrency 10 instead of measuring",
    )
    parser.add_argument("--profile-seconds", type=float, default=15.0)
    parser.add_argument(
        "--ours-config",
        action="append",
        metavar="KEY=VALUE",
        help="an extra config key for our services and clients (repeatable), e.g. "
        "RPC_PERSISTENT_REQUESTS=true RPC_PERSISTENT_REPLIES=true for persistent RPC",
    )
    return parser.parse_args(argv)


def ours_config(pairs: list[str] | None) -> dict[str, str]:
    config = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--ours-config wants KEY=VALUE, not {pair!r}")
        config[key] = value
    return config


def concurrency_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("concurrencies must be at least 1")
    return values


def settings_from(args: argparse.Namespace) -> Settings:
    settings = Settings.quick() if args.quick else Settings()
    if args.runs is not None:
        settings.runs = args.runs
    if args.duration is not None:
        settings.duration = args.duration
    if args.events is not None:
        settings.events = args.events
    if args.concurrency is not None:
        settings.concurrencies = settings.relay_concurrencies = args.concurrency
    if settings.runs < 1:
        raise BenchError("--runs must be at least 1")
    return settings


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    try:
        return run(args)
    except BenchError as exc:
        log.error("bench failed: %s", exc)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted; services stopped and vhost deleted")
        return 130


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    extra = ours_config(args.ours_config)
    # Children inherit it: our clients read it (bench/client.py), our services
    # get it in their config file below.
    os.environ[OURS_CONFIG_ENV] = json.dumps(extra)
    groups = tuple(g for g in GROUPS if g in (args.only or GROUPS))
    check_identical_services()
    frameworks = load_frameworks()
    load_before = os.getloadavg()[0]
    results = Results()
    vhosts: dict[str, Vhost] = {}
    probes: dict[str, BrokerProbe] = {}
    try:
        prefix = vhost_prefix()
        for side in SIDES:
            vhosts[side] = Vhost.create(f"{prefix}_{side}", args.broker)
            log.info("vhost %s created", vhosts[side].name)
        with tempfile.TemporaryDirectory(prefix="bench-") as workdir:
            log_dir = args.log_dir or Path(workdir)
            log_dir.mkdir(parents=True, exist_ok=True)
            registry = ProcessRegistry(log_dir)
            configs = {
                key: write_service_config(
                    Path(workdir) / f"{key}.yaml",
                    vhosts[key].uri,
                    extra if key == "ours" else {},
                )
                for key in frameworks
            }
            probes.update({key: BrokerProbe(vhosts[key].uri) for key in frameworks})
            bench = Bench(
                frameworks=frameworks,
                registry=registry,
                uris={side: vhost.uri for side, vhost in vhosts.items()},
                configs=configs,
                probes=probes,
                settings=settings,
                results=results,
                groups=groups,
            )
            try:
                if args.profile:
                    from bench.profiling import profile

                    for path in profile(bench, args.profile_seconds):
                        sys.stdout.write(f"{path.relative_to(ROOT)}\n")
                    return 0
                define_figures(results, settings, groups)
                for group in groups:
                    GROUP_RUNNERS[group](bench)
                reconnects = sum(probe.reconnects for probe in probes.values())
                if reconnects:
                    results.problems.append(
                        f"the broker dropped the bench's own connections {reconnects} "
                        "time(s) (restarted by someone's test?); figures measured "
                        "then are off"
                    )
                machine = describe_machine(
                    {OURS: frameworks[OURS].python, NAMEKO: frameworks[NAMEKO].python},
                    broker_version(vhosts[OURS].uri),
                )
            finally:
                registry.stop_all()
    finally:
        for probe in probes.values():
            probe.close()
        for vhost in vhosts.values():
            vhost.delete()
            log.info("vhost %s deleted", vhost.name)
    machine["Load average (1 min)"] = (
        f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    command = "python -m bench " + shlex.join(argv_for_report(args))
    table = render(
        results,
        machine,
        {"runs": settings.runs, "command": command.strip()},
        frameworks[NAMEKO].label,
    )
    sys.stdout.write(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(table)
    log.info("table written to %s", args.output)
    return 0


def argv_for_report(args: argparse.Namespace) -> list[str]:
    shown = []
    if args.quick:
        shown.append("--quick")
    if args.runs is not None:
        shown += ["--runs", str(args.runs)]
    for group in args.only or []:
        shown += ["--only", group]
    if args.duration is not None:
        shown += ["--duration", str(args.duration)]
    if args.events is not None:
        shown += ["--events", str(args.events)]
    if args.concurrency is not None:
        shown += ["--concurrency", ",".join(map(str, args.concurrency))]
    for pair in args.ours_config or []:
        shown += ["--ours-config", pair]
    return shown


if __name__ == "__main__":
    sys.exit(main())
