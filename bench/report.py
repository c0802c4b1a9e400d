"""Figures, their medians, and the markdown table the bench prints and saves."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

OURS = "ours"
NAMEKO = "nameko"
RAW = "raw"

MAIN = "main"
CEILING = "ceiling"


@dataclass
class Figure:
    """One measured quantity, with one value per run for each side that has it."""

    key: str
    label: str
    unit: str
    higher_is_better: bool = True
    target: float | None = None
    """The ours/nameko ratio the lead wants: at least this when higher is better,
    at most this when lower is better."""
    section: str = MAIN
    runs: dict[str, list[float]] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)

    def add(self, side: str, value: float) -> None:
        self.runs.setdefault(side, []).append(value)

    def fail(self, side: str) -> None:
        """A run that could not measure this figure (it is left out of the median)."""
        self.failures[side] = self.failures.get(side, 0) + 1

    def median(self, side: str) -> float | None:
        values = self.runs.get(side)
        return statistics.median(values) if values else None

    def ratio(self) -> float | None:
        ours, nameko = self.median(OURS), self.median(NAMEKO)
        if ours is None or not nameko:
            return None
        return ours / nameko

    def target_met(self) -> bool | None:
        ratio = self.ratio()
        if ratio is None or self.target is None:
            return None
        return ratio >= self.target if self.higher_is_better else ratio <= self.target


class Results:
    """Figures in the order they were first measured."""

    def __init__(self) -> None:
        self.figures: dict[str, Figure] = {}
        self.problems: list[str] = []
        """What went wrong while measuring: failed runs, errors services logged."""

    def figure(self, key: str, label: str, unit: str, **options: object) -> Figure:
        if key not in self.figures:
            self.figures[key] = Figure(key, label, unit, **options)  # type: ignore[arg-type]
        return self.figures[key]

    def section(self, name: str) -> list[Figure]:
        return [f for f in self.figures.values() if f.section == name]


# -- the machine --------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


VERSIONS_SNIPPET = (
    "import json, sys, importlib.metadata as m\n"
    "names = sys.argv[1:]\n"
    "def v(n):\n"
    "    try: return m.version(n)\n"
    "    except m.PackageNotFoundError: return None\n"
    "print(json.dumps({'python': sys.version.split()[0], **{n: v(n) for n in names}}))\n"
)


SIDE_PACKAGES = {
    OURS: ["framework", "eventlet", "kombu", "amqp"],
    NAMEKO: ["nameko", "eventlet", "kombu", "amqp"],
}


def venv_versions(python: Path, packages: list[str]) -> dict[str, str | None]:
    # Run from / so that the repository's own egg-info does not answer for a venv.
    output = subprocess.run(
        [str(python), "-c", VERSIONS_SNIPPET, *packages],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    ).stdout
    return json.loads(output)


def code_version(root: Path) -> str:
    """The commit measured, and whether the framework had uncommitted changes."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True
        ).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "framework")
    return f"{commit}, framework/ with uncommitted changes" if dirty else commit


def describe_machine(pythons: dict[str, Path], broker: str) -> dict[str, str]:
    """What a reader needs to judge the figures: hardware, broker, interpreters."""
    description = {
        "Date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "CPU": f"{cpu_model()}, {os.cpu_count()} cores (shared by broker, services and clients)",
        "OS": f"{platform.system()} {platform.release()}",
        "Broker": broker,
        "Commit": code_version(Path(__file__).resolve().parent.parent),
    }
    for side, python in pythons.items():
        versions = venv_versions(python, SIDE_PACKAGES[side])
        packages = ", ".join(
            f"{name} {version}"
            for name, version in versions.items()
            if name != "python" and version
        )
        description[f"Python ({side})"] = f"{versions['python']} ({packages})"
    return description


# -- markdown --------------------------------------------------------------------------------


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "–"
    if unit in ("ms", "s"):
        return f"{value:,.2f}"
    return f"{value:,.0f}"


def format_cell(figure: Figure, side: str) -> str:
    """The median, and how many runs failed if any did."""
    failed = figure.failures.get(side, 0)
    value = format_value(figure.median(side), figure.unit)
    if not failed:
        return value
    if figure.median(side) is None:
        return "failed"
    return f"{value} ({failed} of {failed + len(figure.runs[side])} runs failed)"


def format_ratio(figure: Figure) -> str:
    ratio = figure.ratio()
    return "–" if ratio is None else f"{ratio:.2f}x"


def format_target(figure: Figure) -> str:
    if figure.target is None:
        return ""
    return (
        f"≥ {figure.target:g}x" if figure.higher_is_better else f"≤ {figure.target:g}x"
    )


def format_met(figure: Figure) -> str:
    met = figure.target_met()
    return "" if met is None else ("yes" if met else "**no**")


def render(
    results: Results,
    machine: dict[str, str],
    settings: dict[str, object],
    nameko_label: str,
) -> str:
    runs = settings.get("runs")
    lines = [
        f"# ours vs {nameko_label}",
        "",
        f"`{settings.get('command')}`; every figure is the median of {runs} run(s). "
        "Definitions: `bench/README.md`.",
        "",
        "## Machine",
        "",
        *(f"- **{key}**: {value}" for key, value in machine.items()),
        "",
    ]
    main = results.section(MAIN)
    if main:
        lines += [
            "## Results",
            "",
            f"| Figure | ours | {nameko_label} | ours / nameko | target | met | raw ceiling |",
            "|---|---:|---:|---:|---:|:-:|---:|",
        ]
        for f in main:
            lines.append(
                f"| {f.label} ({f.unit}) | {format_cell(f, OURS)} | "
                f"{format_cell(f, NAMEKO)} | {format_ratio(f)} | {format_target(f)} | "
                f"{format_met(f)} | {format_cell(f, RAW)} |"
            )
        lines.append("")
    ceiling = results.section(CEILING)
    if ceiling:
        lines += [
            "## Ceiling: raw py-amqp request/reply loop",
            "",
            "| Loop | value |",
            "|---|---:|",
        ]
        lines += [f"| {f.label} ({f.unit}) | {format_cell(f, RAW)} |" for f in ceiling]
        lines.append("")
    if results.problems:
        lines += [
            "## Problems seen while measuring",
            "",
            "Figures measured while these happened are suspect.",
            "",
        ]
        lines += [f"- {problem}" for problem in results.problems]
        lines.append("")
    lines += [
        "## Every run",
        "",
        f"| Figure | ours | {nameko_label} | raw |",
        "|---|---|---|---|",
    ]
    for f in results.figures.values():
        cells = [
            " / ".join(format_value(v, f.unit) for v in f.runs.get(side, [])) or "–"
            for side in (OURS, NAMEKO, RAW)
        ]
        lines.append(f"| {f.label} ({f.unit}) | {' | '.join(cells)} |")
    lines.append("")
    return "\n".join(lines)
