"""nameko 2.14.1's own test suite, ported to ``framework`` and run module by module.

    .venv/bin/python tools/nameko_suite.py                 # everything, writes the report
    .venv/bin/python tools/nameko_suite.py --module test_rpc.py --no-report

Not part of CI: it downloads nameko's sdist from PyPI (CI must not depend on that).
What it does, in ``.cache/nameko-suite/``:

1. downloads ``nameko==2.14.1`` as a source distribution and unpacks its ``test/``;
2. ports it: every reference to a nameko *module* (``import nameko.rpc``,
   ``from nameko.testing import``, ``patch('nameko.amqp.publish.x')``) becomes
   ``framework``; wire strings that merely start with ``nameko`` (``nameko-rpc``,
   the ``nameko.call_id_stack`` header) are kept, because they are the protocol;
3. makes a virtual environment with this project installed and what nameko's tests
   import besides (``mock``, ``six``), and runs each test module in its own pytest
   process with a timeout, against the local RabbitMQ;
4. classifies every test that did not pass (see ``classify``) and prints a table per
   module; unless ``--no-report``, writes it to ``docs/nameko-suite-report.md``.

The classification is what makes the figure honest: a test that patches a private
name of nameko's implementation, or that needs a TLS listener or toxiproxy, says
nothing about whether a nameko user's code runs here; the rest do.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

NAMEKO_VERSION = "2.14.1"
ROOT = Path(__file__).resolve().parent.parent
WORKDIR = ROOT / ".cache" / "nameko-suite"
REPORT = ROOT / "docs" / "nameko-suite-report.md"
EXTRA_REQUIREMENTS = ["mock", "six"]
MODULE_TIMEOUT = 600

# Outcomes of a test that did not pass, in the report's order.
MISSING = "missing name"
INTERNALS = "nameko internals"
BEHAVIOUR = "behaviour"
ENVIRONMENT = "environment"
CATEGORIES = (MISSING, BEHAVIOUR, INTERNALS, ENVIRONMENT)

# Tests whose subject is an environment this machine does not have.
ENVIRONMENT_PATTERNS = (
    re.compile(r"toxiproxy", re.I),
    re.compile(r"\bssl\b|_ssl|ssl_|\btls\b", re.I),
)

# A failure text that names a private attribute of a ported module: the test reaches
# into nameko's implementation (``patch('nameko.rpc._thing')``,
# ``container._worker_threads``), not its public API.
PRIVATE_ATTRIBUTE = re.compile(
    r"(has no attribute|does not have the attribute) '_[A-Za-z0-9_]+'"
)
# A public name that nameko has and we lack.
MISSING_NAME = re.compile(
    r"cannot import name|No module named 'framework|has no attribute '[A-Za-z]"
    r"|does not have the attribute '[A-Za-z]"
)

# Tests of nameko's internals that fail for another reason than a private name in the
# message (they assert on how nameko's classes call each other). Node-id prefixes,
# each with the reason it is set aside.
INTERNALS_TESTS: dict[str, str] = {
    "test/test_queue_consumer.py": "QueueConsumer is nameko's kombu ConsumerMixin; ours "
    "is framework.amqp.consume with its own API",
    "test/amqp/test_publish.py": "asserts on nameko's Publisher calling kombu's "
    "producer pool; ours publishes on one confirm-mode connection per container",
    "test/test_rpc_responder.py": "constructs nameko's Responder with its private "
    "arguments",
}


@dataclasses.dataclass
class Result:
    module: str
    name: str
    outcome: str  # passed, failed, error, skipped
    message: str = ""
    category: str = ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=WORKDIR)
    parser.add_argument("--module", action="append", default=[], help="only these")
    parser.add_argument("--timeout", type=int, default=MODULE_TIMEOUT)
    parser.add_argument("--no-report", action="store_true")
    parser.add_argument("--amqp-uri", default="amqp://guest:guest@127.0.0.1:5672/")
    args = parser.parse_args(argv)

    sdist = fetch_sdist(args.workdir)
    ported = port_tests(sdist, args.workdir / "ported")
    python = make_venv(args.workdir / "venv")
    modules = sorted(
        str(path.relative_to(ported)) for path in (ported / "test").rglob("test_*.py")
    )
    if args.module:
        modules = [m for m in modules if any(pat in m for pat in args.module)]

    results: list[Result] = []
    for module in modules:
        started = time.monotonic()
        found = run_module(python, ported, module, args)
        results.extend(found)
        counts = Counter(r.outcome for r in found)
        print(
            f"{module:55} {counts['passed']:4} passed {counts['failed']:4} failed "
            f"{counts['error']:3} errors {counts['skipped']:3} skipped "
            f"({time.monotonic() - started:.0f}s)",
            flush=True,
        )
    for result in results:
        result.category = classify(result)

    table = render(results)
    print(table)
    if not args.no_report and not args.module:
        REPORT.write_text(table)
        print(f"written: {REPORT.relative_to(ROOT)}")
    return 0


def fetch_sdist(workdir: Path) -> Path:
    """nameko's unpacked source distribution, downloaded once."""
    unpacked = workdir / f"nameko-{NAMEKO_VERSION}"
    if (unpacked / "test").is_dir():
        return unpacked
    workdir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"nameko=={NAMEKO_VERSION}",
            "-d",
            str(workdir),
        ],
        check=True,
    )
    archive = workdir / f"nameko-{NAMEKO_VERSION}.tar.gz"
    with tarfile.open(archive) as tar:
        tar.extractall(workdir, filter="data")
    return unpacked


def port_tests(sdist: Path, target: Path) -> Path:
    """A copy of nameko's ``test/`` that imports ``framework`` instead of ``nameko``."""
    modules = sorted(
        path.stem
        for path in (sdist / "nameko").iterdir()
        if path.suffix == ".py" or (path / "__init__.py").exists()
    )
    modules = [m for m in modules if m != "__init__"]
    rename = port_text_factory(modules)
    if target.exists():
        shutil.rmtree(target)
    for source in (sdist / "test").rglob("*"):
        destination = target / "test" / source.relative_to(sdist / "test")
        if source.is_dir():
            destination.mkdir(parents=True, exist_ok=True)
        elif source.suffix == ".py":
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_text(rename(source.read_text()))
        else:
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination)
    # nameko's setup.cfg section for pytest, minus what is nameko-specific.
    (target / "pytest.ini").write_text(
        "[pytest]\n"
        "filterwarnings =\n    ignore::DeprecationWarning\n"
        "markers =\n    publish_retry\n    behavioural\n"
    )
    return target


def port_text_factory(modules: list[str]):  # type: ignore[no-untyped-def]
    """A function renaming references to nameko's modules (and nothing else)."""
    module_ref = re.compile(r"\bnameko((?:\.(?:" + "|".join(modules) + r"))\b)")
    statement = re.compile(r"^(\s*)(from|import)\s+nameko\b", re.M)

    def rename(text: str) -> str:
        text = statement.sub(r"\1\2 framework", text)
        return module_ref.sub(r"framework\1", text)

    return rename


def make_venv(venv: Path) -> Path:
    """A virtual environment with this project and nameko's test requirements."""
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    if stamp.exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-e",
            f"{ROOT}[dev]",
            *EXTRA_REQUIREMENTS,
        ],
        check=True,
    )
    stamp.write_text("ok\n")
    return python


def run_module(
    python: Path, ported: Path, module: str, args: argparse.Namespace
) -> list[Result]:
    junit = args.workdir / "junit" / (module.replace("/", "__") + ".xml")
    junit.parent.mkdir(parents=True, exist_ok=True)
    if junit.exists():
        junit.unlink()
    env = dict(os.environ, PYTHONPATH=str(ported))
    command = [
        str(python),
        "-m",
        "pytest",
        module,
        "-q",
        "-p",
        "no:cacheprovider",
        "--timeout",
        "60",
        f"--junitxml={junit}",
        "--amqp-uri",
        args.amqp_uri,
        "-o",
        "addopts=",
    ]
    try:
        finished = subprocess.run(
            command,
            cwd=ported,
            env=env,
            timeout=args.timeout,
            capture_output=True,
            text=True,
        )
    except subprocess.TimeoutExpired:
        return [Result(module, "(module)", "error", f"timed out after {args.timeout}s")]
    if not junit.exists():
        # Typically the conftest failed to import: its error is the module's result.
        tail = (finished.stdout + finished.stderr).strip().splitlines()[-3:]
        message = " / ".join(tail) or f"pytest exited {finished.returncode}"
        return [Result(module, "(module)", "error", message)]
    return parse_junit(module, junit)


def parse_junit(module: str, junit: Path) -> list[Result]:
    results = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = case.get("name", "?")
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            element = case.find(tag)
            if element is not None:
                outcome = "failed" if tag == "failure" else tag
                message = (element.get("message") or element.text or "").strip()
                break
        results.append(Result(module, name, outcome, message))
    if not results:
        results.append(Result(module, "(collection)", "error", "no test collected"))
    return results


def classify(result: Result) -> str:
    """Why a test did not pass: one of ``CATEGORIES``, or "" if it passed."""
    if result.outcome in ("passed",):
        return ""
    node = f"{result.module}::{result.name}"
    text = f"{node}\n{result.message}"
    if any(pattern.search(text) for pattern in ENVIRONMENT_PATTERNS):
        return ENVIRONMENT
    for prefix in INTERNALS_TESTS:
        if node.startswith(prefix):
            return INTERNALS
    if PRIVATE_ATTRIBUTE.search(result.message):
        return INTERNALS
    if MISSING_NAME.search(result.message):
        return MISSING
    return BEHAVIOUR


def render(results: list[Result]) -> str:
    totals = Counter(r.outcome for r in results)
    categories = Counter(r.category for r in results if r.category)
    relevant = [r for r in results if r.category not in (INTERNALS, ENVIRONMENT)]
    relevant_passed = sum(1 for r in relevant if r.outcome == "passed")
    share = 100.0 * relevant_passed / len(relevant) if relevant else 0.0
    lines = [
        f"# nameko {NAMEKO_VERSION}'s test suite against framework",
        "",
        "Generated by `tools/nameko_suite.py`; do not edit by hand.",
        "",
        f"- tests: {len(results)}; passed {totals['passed']}, failed "
        f"{totals['failed']}, errors {totals['error']}, skipped {totals['skipped']}",
        "- not passed, by cause: "
        + ", ".join(f"{c} {categories[c]}" for c in CATEGORIES),
        f"- passing among tests that are neither about nameko's internals nor about a "
        f"missing environment: {relevant_passed} of {len(relevant)} ({share:.1f}%)",
        "",
        "| module | passed | failed | errors | skipped |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    by_module: dict[str, Counter[str]] = {}
    for r in results:
        by_module.setdefault(r.module, Counter())[r.outcome] += 1
    for module, counts in by_module.items():
        lines.append(
            f"| {module} | {counts['passed']} | {counts['failed']} | "
            f"{counts['error']} | {counts['skipped']} |"
        )
    for category in CATEGORIES:
        rows = [r for r in results if r.category == category]
        if not rows:
            continue
        lines += ["", f"## {category} ({len(rows)})", ""]
        for r in rows:
            first = r.message.splitlines()[0][:160] if r.message else ""
            reason = next(
                (
                    why
                    for p, why in INTERNALS_TESTS.items()
                    if f"{r.module}::{r.name}".startswith(p)
                ),
                "",
            )
            detail = reason or first
            lines.append(f"- `{r.module}::{r.name}` ({r.outcome}): {detail}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
