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
import ast
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

NAMEKO_VERSION = "2.14.1"
ROOT = Path(__file__).resolve().parent.parent
WORKDIR = ROOT / ".cache" / "nameko-suite"
REPORT = ROOT / "docs" / "nameko-suite-report.md"
# What nameko's tests import besides nameko, and ``regex``: nameko supports nested
# environment variable defaults in config only with it installed (its "examples"
# extra), and its tests check the supported behaviour when it is there, the
# refusal otherwise. We support them always, so the suite runs where nameko
# supports them too.
EXTRA_REQUIREMENTS = ["mock", "six", "regex"]
MODULE_TIMEOUT = 900
TEST_TIMEOUT = 30

# Outcomes of a test that did not pass, in the report's order.
MISSING = "missing name"
INTERNALS = "nameko internals"
BEHAVIOUR = "behaviour"
ENVIRONMENT = "environment"
DELIBERATE_CATEGORY = "deliberate difference"
SKIPPED = "skipped by the suite"
CATEGORIES = (MISSING, BEHAVIOUR, DELIBERATE_CATEGORY, INTERNALS, ENVIRONMENT, SKIPPED)
# Not counted in the figure: they say nothing about whether a user's code runs here.
SET_ASIDE = (INTERNALS, ENVIRONMENT, SKIPPED)

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
# The module (or conftest) failed to import a name.
IMPORT_FAILURE = re.compile(r"cannot import name|No module named")
# A public name that nameko has and we lack.
MISSING_NAME = re.compile(
    r"cannot import name|No module named 'framework|has no attribute '[A-Za-z]"
    r"|does not have the attribute '[A-Za-z]"
)

# Tests that fail because we differ on purpose: each is a row of the "Where we
# deliberately differ from nameko" table in docs/framework.md. They stay in the
# figure's denominator (a nameko user does see the difference).
_TABLE = "docs/framework.md, differences table: "
DELIBERATE: dict[str, str] = {
    "test/cli/test_main.py::test_error": _TABLE + "CLI errors (stderr, exit 1; nameko "
    "printed them on stdout and exited 0)",
    "test/cli/test_main.py::test_flag_action": _TABLE + "CLI (our backdoor client is "
    "built in; there is no telnet to wrap in rlwrap)",
    "test/test_timers.py::test_expected_error_in_worker": _TABLE + "worker error log "
    "lines (one structured record; the test reads nameko's %s arguments)",
    "test/test_errors.py::test_dependency_call_lifecycle_errors": _TABLE
    + "errors in dependency hooks (the worker fails and readiness turns 503; the "
    "test waits for the container to die)",
    "test/test_service_runner.py::test_runner_with_duplicate_services": _TABLE
    + "duplicate service names in a runner (ValueError instead of silently "
    "replacing the first)",
    "test/web/test_http_handler.py::test_broken_method": _TABLE + "HTTP errors "
    "(JSON body; an unexpected error's text is not sent)",
    "test/web/test_http_handler.py::test_bad_payload": _TABLE + "HTTP errors and "
    "HTTP bodies (JSON error body; non-str bodies are accepted)",
    "test/test_messaging.py::test_header_decoder": _TABLE + "context from headers "
    "(only prefixed headers become context; the test expects `differentprefix.foo` "
    "too)",
    "test/cli/test_test.py": _TABLE + "CLI (no `test` command: plain pytest with "
    "our plugin; the console script is `framework`)",
    "test/cli/test_shell.py::TestExitCode": _TABLE + "CLI (runs the `nameko` "
    "executable; ours is `framework`, whose piped scripts exit 0 and 1 alike, "
    "tests/framework/cli/test_shell.py)",
    "test/cli/test_backdoor.py": _TABLE + "CLI (our backdoor client is built in: no "
    "telnet or netcat found with os.system and run under rlwrap with call)",
    "test/cli/test_show_config.py": _TABLE + "show-config (keys in the file's order, "
    "not sorted; the test also patches framework.cli.main's os, where nameko's "
    "substitution read the environment)",
    # Their stdin is pytest's, not a terminal: ours runs it as a script where nameko
    # fed it to code.interact, which they patch and expect called.
    **{
        f"test/cli/test_shell.py::{name}": _TABLE + "shell (piped stdin runs as one "
        "script, not line by line in code.interact)"
        for name in (
            "test_basic",
            "test_plain",
            "test_plain_fallback",
            "test_config",
            "test_uses_plain_when_not_tty",
        )
    },
    "test/test_handle_result.py::test_handle_result": _TABLE + "unexpected errors in "
    "RPC replies (type and correlation id only, never the text)",
    "test/web/test_server.py::test_other_socket_error": _TABLE + "an unexpected "
    "error on one HTTP connection (ends that connection; the test waits for the "
    "container to die)",
    "test/web/test_server.py::test_other_os_error": _TABLE + "an unexpected error "
    "on one HTTP connection (as above)",
    **{
        f"test/test_errors.py::{name}": _TABLE + "errors in dependency hooks and "
        "`handle_result` (logged, the container keeps serving; the test patches "
        "RpcConsumer.handle_result to raise and waits for the container to die)"
        for name in (
            "test_handle_result_error",
            "test_runner_catches_container_errors",
            "test_graceful_stop_on_one_container_error",
        )
    },
    "test/standalone/test_event_dispatcher.py::TestMandatoryDelivery::"
    "test_mandatory_delivery_no_exchange": _TABLE + "standalone event dispatcher "
    "exchange (declared, so a mandatory event to a service that never ran is "
    "UndeliverableMessage, not the broker's NotFound)",
    "test/testing/test_pytest_plugin.py::TestMonkeyPatchWarning": _TABLE + "pytest "
    "plugin (monkey-patches on import; the inner test asserts nothing is patched)",
    "test/testing/test_pytest_plugin.py::TestFastTeardown::test_order": _TABLE
    + "pytest fast_teardown (containers torn down before their vhost, not after)",
    "test/testing/test_services.py::test_worker_factory": _TABLE + "test doubles "
    "(unittest.mock's MagicMock; the test checks isinstance against the `mock` "
    "backport package's Mock, a separate class)",
}

# Tests of nameko's internals that fail for another reason than a private name in the
# message (they assert on how nameko's classes call each other). Node-id prefixes,
# each with the reason it is set aside.
INTERNALS_TESTS: dict[str, str] = {
    "test/test_queue_consumer.py": "QueueConsumer is nameko's kombu ConsumerMixin; ours "
    "is framework.amqp.consume with its own API",
    "test/test_rpc_responder.py": "constructs nameko's Responder with its private "
    "arguments",
    "test/test_log_helpers.py::test_timing_logger": "patches the module's `time` and "
    "feeds time.time(); ours measures with time.perf_counter (docs/framework.md, "
    "differences table: make_timing_logger)",
    "test/testing/test_utils.py::TestResourcePipeline::test_pipeline": "asserts that "
    "exactly size+1 resources exist when full, an artefact of nameko's creator "
    "blocking on a full queue with one in hand; ours creates only what fits",
    "test/testing/test_utils.py::TestFindFreePort": "patches the module's `socket` "
    "import with a mock shaped after nameko's calls (no context manager)",
    "test/standalone/test_rpc_proxy.py::TestConsumeEvent": "builds nameko's "
    "ConsumeEvent around a mocked PollingQueueConsumer; ours waits on the proxy's "
    "own connection",
    "test/cli/test_run.py::test_stopping": "replaces the module's eventlet to drive "
    "nameko's wait loop (KeyboardInterrupt from runlet.wait()); ours turns signals "
    "into stop and kill through a wakeup fd (tests/framework/cli/test_run.py sends "
    "real signals)",
    "test/cli/test_run.py::test_os_error_for_signal": "replaces the module's eventlet "
    "to raise EINTR from nameko's runlet.wait(); ours never waits in an interruptible "
    "call there",
    "test/cli/test_run.py::test_other_errors_propagate": "replaces the module's "
    "eventlet to raise an OSError from nameko's runlet.wait()",
    "test/standalone/test_rpc_proxy.py::test_proxy_connection_error": "patches "
    "get_message of nameko's PollingQueueConsumer, reached as "
    "proxy.reply_listener.queue_consumer; ours has no polling consumer",
    "test/standalone/test_rpc_proxy.py::test_consumer_replacing": "calls "
    "_setup_consumer of nameko's PollingQueueConsumer and swaps its replies dict",
    "test/standalone/test_rpc_proxy.py::test_recover_from_keyboardinterrupt": "patches "
    "kombu's Connection.drain_events to raise KeyboardInterrupt; our reader threads "
    "hand frames to py-amqp below it, so the call waits for a reply that never comes",
    "test/standalone/test_rpc_proxy.py::test_unexpected_correlation_id": "builds "
    "nameko's Responder(amqp_uri, exchange, serializer, message) and patches the "
    "module's private _logger",
    "test/amqp/test_publish.py::TestPublisher::test_declare": "wraps "
    "kombu.messaging.maybe_declare and asserts the publisher declares through it; "
    "ours declares on its own channel, once per connection (the declarations "
    "themselves: tests/framework/amqp/test_publish.py)",
    "test/amqp/test_publish.py::TestPublisher::test_retry": "patches kombu's "
    "Producer._publish to raise and counts its calls; ours writes to py-amqp's "
    "channel directly, so the patch is never called (test_retry and "
    "test_retry_policy)",
    "test/testing/test_utils.py::test_get_extension": "asserts the exact set of a "
    "container's extensions; ours also holds the shared ContainerPublisher RPC "
    "replies go out on (nameko's Responder opened a producer per reply)",
    "test/test_messaging.py::test_consume_provider": "replaces the QueueConsumer "
    "with a Mock and asserts nameko's QueueConsumer API (ack_message, "
    "requeue_message) and container.spawn_worker(handle_result=...); ours "
    "settles the message itself",
    "test/test_messaging.py::test_consume_from_rabbit": "runs the QueueConsumer "
    "against a Mock container shaped after nameko's: it has no free_workers, "
    "which ours asks so that a full worker pool never blocks the consumer loop",
    "test/testing/test_pytest_plugin.py::TestFastTeardown::"
    "test_consumer_mixin_patch": "checks that the plugin patches kombu's "
    "ConsumerMixin to stop at teardown; nothing of ours uses ConsumerMixin",
}

# Tests that need something this machine's libraries do not give them, with why.
ENVIRONMENT_TESTS: dict[str, str] = {
    "test/web/test_websocket.py::test_client_closing_connection": "its on_close(ws) "
    "takes one argument; websocket-client 1.x calls on_close(ws, status, reason), "
    "so the TypeError is swallowed and the wait for it never ends (with "
    "on_close(ws, *args) it passes)",
}


# A pytest plugin written next to the ported tests: one JSON line per test as soon as
# it finishes, and one when it starts. pytest-timeout ends the whole process on a
# hung test (eventlet makes its signal method unsafe), so a junit file written at the
# end would lose the module; this log keeps what ran, and names the test that hung.
RESULT_LOG_PLUGIN = """
import json
import os

_PATH = os.environ["NAMEKO_SUITE_LOG"]


def _write(record):
    with open(_PATH, "a") as log:
        log.write(json.dumps(record) + "\\n")


def pytest_runtest_logstart(nodeid, location):
    _write({"node": nodeid, "event": "start"})


def pytest_runtest_logfinish(nodeid, location):
    _write({"node": nodeid, "event": "finish"})


def pytest_runtest_logreport(report):
    if report.when == "call":
        outcome = report.outcome
    elif report.outcome == "skipped":
        outcome = "skipped"
    elif report.outcome == "failed":
        outcome = "error"  # in a fixture's setup or teardown
    else:
        return
    message = ""
    if report.longrepr is not None:
        if isinstance(report.longrepr, tuple):  # a skip: (path, line, reason)
            message = str(report.longrepr[2])
        else:
            crash = getattr(report.longrepr, "reprcrash", None)
            message = crash.message if crash is not None else str(report.longrepr)
    _write({"node": report.nodeid, "event": outcome, "message": message})


def pytest_collectreport(report):
    if report.failed:
        _write({"node": report.nodeid, "event": "collect-error",
                "message": str(report.longrepr)[-2000:]})
"""


# Seams of nameko's implementation that a test's source (or a fixture it takes)
# replaces with mocks: such a test asserts on how nameko's classes call kombu, which
# says nothing about what a user sees. Only applied to tests that did not pass.
_POOL_REASON = (
    "replaces nameko's kombu producer/connection pool (amqp.publish.producers, "
    "connections, get_producer) with a mock and asserts on its calls; ours publishes "
    "on the container's confirm channel, so the mock is never called"
)
INTERNAL_SEAMS: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(
            r"framework\.amqp\.publish\.(producers|connections|get_producer"
            r"|get_connection)\b"
        ),
        _POOL_REASON,
    ),
    (re.compile(r"\b(mock_producer|mock_channel)\b"), _POOL_REASON),
    (
        re.compile(
            r"patch\(\s*['\"]framework(\.\w+)+\.(warnings|time|socket|os|sys|eventlet"
            r"|code|logging|BaseHTTPServer)['\"]"
        ),
        "patches a module that nameko's implementation imports (warnings, time, "
        "socket...) and asserts on its calls; ours does not make those calls there",
    ),
)


# The management API fills a queue's ``consumer_details`` (and ``consumers``) from
# statistics collected every 5 s by default; nameko's tests read them right after
# starting consumers, which needs a broker configured to collect far more often.
STATS_LAG = re.compile(r"assert 0 == \d+|KeyError: 'messages'")
STATS_SOURCE = re.compile(r"consumer_details|get_rabbit_connections|\['messages'\]")
STATS_LAG_REASON = (
    "reads consumers, connections or message counts from the management API right "
    "after they change; this broker collects statistics every 5 s (its default), so "
    "they are still empty"
)


@dataclasses.dataclass
class Result:
    module: str
    name: str
    outcome: str  # passed, failed, error, skipped
    message: str = ""
    category: str = ""
    reason: str = ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=WORKDIR)
    parser.add_argument("--module", action="append", default=[], help="only these")
    parser.add_argument("--timeout", type=int, default=MODULE_TIMEOUT)
    parser.add_argument("--no-report", action="store_true")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="with --module: merge into the last full run's saved results and "
        "write the report from them",
    )
    parser.add_argument(
        "--rerender",
        action="store_true",
        help="run nothing: classify the saved results again and write the report",
    )
    parser.add_argument("--amqp-uri", default="amqp://guest:guest@127.0.0.1:5672/")
    args = parser.parse_args(argv)

    if args.rerender:
        ported = args.workdir / "ported"  # as ported by the run that saved them
    else:
        sdist = fetch_sdist(args.workdir)
        ported = port_tests(sdist, args.workdir / "ported")
        python = make_venv(args.workdir / "venv")
    modules = sorted(
        str(path.relative_to(ported)) for path in (ported / "test").rglob("test_*.py")
    )
    if args.module:
        modules = [m for m in modules if any(pat in m for pat in args.module)]

    saved_path = args.workdir / "results.json"
    saved: dict[str, list[dict[str, str]]] = (
        json.loads(saved_path.read_text()) if saved_path.exists() else {}
    )
    if args.rerender:
        modules = []  # and python is never needed

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
    for module in modules:
        saved[module] = [dataclasses.asdict(r) for r in results if r.module == module]
    saved_path.write_text(json.dumps(saved, indent=1))
    if args.rerender or args.merge:
        results = [Result(**row) for rows in saved.values() for row in rows]
    for result in results:
        result.category, result.reason = classify(result, ported)

    table = render(results)
    print(table)
    if not args.no_report and (not args.module or args.merge or args.rerender):
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
    (target / "_suite_log.py").write_text(RESULT_LOG_PLUGIN)
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
    """Every test of ``module``, run in as few pytest processes as hangs allow.

    A test that hangs past pytest-timeout ends its process: it is recorded as an
    error ("timed out") and pytest runs again without it and without what already
    has a result.
    """
    log_path = args.workdir / "logs" / (module.replace("/", "__") + ".jsonl")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if log_path.exists():
        log_path.unlink()
    env = dict(os.environ, PYTHONPATH=str(ported), NAMEKO_SUITE_LOG=str(log_path))
    outcomes: dict[str, tuple[str, str]] = {}
    deadline = time.monotonic() + args.timeout
    while True:
        command = [
            str(python),
            "-m",
            "pytest",
            module,
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "_suite_log",
            "--timeout",
            str(TEST_TIMEOUT),
            # eventlet can keep a SIGALRM from interrupting a hung fixture; the
            # thread method ends the process, and the log says where it was.
            "--timeout-method=thread",
            "--amqp-uri",
            args.amqp_uri,
            "-o",
            "addopts=",
            *(f"--deselect={node}" for node in outcomes),
        ]
        remaining = deadline - time.monotonic()
        try:
            finished = subprocess.run(
                command,
                cwd=ported,
                env=env,
                timeout=max(remaining, 1),
                capture_output=True,
                text=True,
            )
        except subprocess.TimeoutExpired:
            finished = None
        hung = read_log(log_path, outcomes)
        if hung is not None and hung not in outcomes:
            outcomes[hung] = ("error", f"timed out after {TEST_TIMEOUT}s")
        elif hung is not None:  # its result is in; a fixture's teardown hung
            outcome, message = outcomes[hung]
            outcomes[hung] = (outcome, f"{message} (then its teardown hung)")
        if hung is None or finished is None or time.monotonic() > deadline:
            break
    results: list[Result] = []
    for node, (outcome, message) in outcomes.items():
        if outcome == "collect-error":
            results.extend(
                Result(module, name, "error", first_error_line(message))
                for name in static_test_names(ported / module)
            )
            continue
        name = node.split("::", 1)[1] if "::" in node else node
        results.append(Result(module, name, outcome, message))
    if not results:
        tail = ""
        if finished is not None:
            tail = " / ".join(
                (finished.stdout + finished.stderr).strip().splitlines()[-3:]
            )
        results.append(Result(module, "(module)", "error", tail or "no test ran"))
    return results


def read_log(path: Path, outcomes: dict[str, tuple[str, str]]) -> str | None:
    """Fold the log into ``outcomes``; the test that started and never finished."""
    started: str | None = None
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        record = json.loads(line)
        node, event = record["node"], record["event"]
        if event == "start":
            started = node
            continue
        if event == "finish":
            started = None  # setup, call and teardown all done
            continue
        previous = outcomes.get(node)
        # A teardown error after a pass is what the test ends as; a skip or pass
        # never hides an earlier failure.
        if previous is None or previous[0] in ("passed", "skipped"):
            outcomes[node] = (event, record.get("message", ""))
    path.unlink()
    return started


def first_error_line(text: str) -> str:
    errors = [line for line in text.splitlines() if line.startswith("E ")]
    return (errors[-1][1:].strip() if errors else text.strip()[-300:]) or "collection"


def static_test_names(path: Path) -> list[str]:
    """The tests a module would have, read from its source (it failed to import).

    Functions ``test*`` at module level or in ``Test*`` classes, times the length of
    each literal ``pytest.mark.parametrize`` list; parametrized fixtures are not
    expanded, so this undercounts a little rather than inflating the figure.
    """

    def multiplicity(function: ast.FunctionDef) -> int:
        count = 1
        for decorator in function.decorator_list:
            if (
                isinstance(decorator, ast.Call)
                and getattr(decorator.func, "attr", "") == "parametrize"
                and len(decorator.args) >= 2
                and isinstance(decorator.args[1], (ast.List, ast.Tuple))
            ):
                count *= max(len(decorator.args[1].elts), 1)
        return count

    names = []
    tree = ast.parse(path.read_text())
    for node in tree.body:
        functions: list[tuple[str, ast.FunctionDef]] = []
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
            functions.append(("", node))
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            functions += [
                (f"{node.name}::", item)
                for item in node.body
                if isinstance(item, ast.FunctionDef) and item.name.startswith("test")
            ]
        for prefix, function in functions:
            count = multiplicity(function)
            names += [
                f"{prefix}{function.name}" + (f"[{i}]" if count > 1 else "")
                for i in range(count)
            ]
    return names


def classify(result: Result, ported: Path) -> tuple[str, str]:
    """Why a test did not pass: (one of ``CATEGORIES``, the reason), or ("", "")."""
    if result.outcome == "passed":
        return "", ""
    node = f"{result.module}::{result.name}"
    text = f"{node}\n{result.message}"
    if any(pattern.search(text) for pattern in ENVIRONMENT_PATTERNS):
        return ENVIRONMENT, ""
    for prefix, why in ENVIRONMENT_TESTS.items():
        if node.startswith(prefix):
            return ENVIRONMENT, why
    if result.outcome == "skipped":
        # nameko's own skip conditions (a kombu limitation, a parameter combination
        # that makes no sense): skipped under nameko as well.
        return SKIPPED, ""
    # A difference we chose is counted against the figure even when the test also
    # reaches into nameko's internals: set aside, it would flatter the figure.
    for prefix, why in DELIBERATE.items():
        if node.startswith(prefix):
            return DELIBERATE_CATEGORY, why
    for prefix, why in INTERNALS_TESTS.items():
        if node.startswith(prefix):
            return INTERNALS, why
    if PRIVATE_ATTRIBUTE.search(result.message):
        return INTERNALS, ""
    if IMPORT_FAILURE.search(result.message):
        # Its module did not import: whatever the test is about, it never ran.
        return MISSING, ""
    source = test_source(ported / result.module, result.name)
    if "rabbit_ssl_config" in source and "ECONNREFUSED" in result.message:
        return ENVIRONMENT, "needs the broker's TLS listener (port 5671), absent here"
    if STATS_SOURCE.search(source) and STATS_LAG.search(result.message):
        return ENVIRONMENT, STATS_LAG_REASON
    for pattern, why in INTERNAL_SEAMS:
        if pattern.search(source):
            return INTERNALS, why
    if MISSING_NAME.search(result.message):
        return MISSING, ""
    return BEHAVIOUR, ""


_SOURCES: dict[Path, dict[str, str]] = {}


def test_source(path: Path, name: str) -> str:
    """The source of test ``name`` (``Class::test[param]``) and of the fixtures it
    takes that are defined in its module (module level or its class)."""
    if path not in _SOURCES:
        text = path.read_text()
        index: dict[str, str] = {}
        for node in ast.parse(text).body:
            if isinstance(node, ast.FunctionDef):
                index[node.name] = ast.get_source_segment(text, node) or ""
            elif isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef):
                        segment = ast.get_source_segment(text, item) or ""
                        index[f"{node.name}::{item.name}"] = segment
        _SOURCES[path] = index
    index = _SOURCES[path]
    key = name.split("[", 1)[0]
    owner = key.rsplit("::", 1)[0] + "::" if "::" in key else ""
    # The test, then the fixtures it takes, and theirs (three levels are enough
    # for nameko's class fixtures built on module fixtures).
    seen: set[str] = set()
    level = [key]
    parts = []
    for _ in range(4):
        following = []
        for item in level:
            if item in seen:
                continue
            seen.add(item)
            text = index.get(item, "")
            parts.append(text)
            match = re.search(r"def \w+\(([^)]*)\)", text)
            for parameter in re.findall(r"\w+", match.group(1) if match else ""):
                if f"{owner}{parameter}" in index:
                    following.append(f"{owner}{parameter}")
                elif parameter in index:
                    following.append(parameter)
        level = following
    source = "\n".join(parts)
    return source


def render(results: list[Result]) -> str:
    totals = Counter(r.outcome for r in results)
    categories = Counter(r.category for r in results if r.category)
    relevant = [r for r in results if r.category not in SET_ASIDE]
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
        f"missing environment (nor skipped by the suite itself): {relevant_passed} of "
        f"{len(relevant)} ({share:.1f}%)",
        "",
        "| module | passed | failed | errors | skipped |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    by_module: dict[str, Counter[str]] = {}
    for r in results:
        by_module.setdefault(r.module, Counter())[r.outcome] += 1
    for module, counts in sorted(by_module.items()):
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
            reason = r.reason
            # No path of this machine in the committed report.
            detail = (reason or first).replace(f"{ROOT}/", "")
            lines.append(f"- `{r.module}::{r.name}` ({r.outcome}): {detail}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
