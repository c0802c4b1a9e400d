"""``framework.logs``: JSON lines and key=value text, and the per-worker record.

Output goes to an in-memory stream and is parsed back, so every assertion is on
what an operator's log pipeline would read.
"""

from __future__ import annotations

import io
import json
import logging
import re
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from framework import logs
from framework.containers import ServiceContainer
from framework.exceptions import ConfigurationError
from framework.extensions import DependencyProvider, Entrypoint
from framework.testing.services import entrypoint_hook
from framework.utils import REDACTED
from tests.helpers import wait_for

entrypoint = Entrypoint.decorator


DRIVER_ERROR = "INSERT failed, parameters: {!r}, {!r}"


class Refused(Exception):
    pass


class Service:
    name = "logs_test_service"

    @entrypoint
    def succeed(self, value: int) -> int:
        return value

    @entrypoint(expected_exceptions=Refused)
    def refuse(self) -> None:
        raise Refused("not today")

    @entrypoint
    def crash(self) -> None:
        raise RuntimeError("boom")

    @entrypoint(sensitive_arguments=("password", "profile.tokens[0]"))
    def store(self, email: str, password: str, profile: dict[str, Any]) -> None:
        # As a driver's error would: the statement's parameters in the message.
        raise RuntimeError(DRIVER_ERROR.format(email, password))

    @entrypoint(expected_exceptions=Refused, sensitive_arguments="password")
    def check(self, email: str, password: str) -> None:
        raise Refused(f"no account for {email}")


@pytest.fixture(autouse=True)
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Undo configure_logging: the root logger is process-wide."""
    monkeypatch.delenv("LOG_FORMAT", raising=False)
    monkeypatch.delenv("LOG_LEVEL", raising=False)
    root = logging.getLogger()
    level = root.level
    yield
    if logs._installed_handler is not None:
        root.removeHandler(logs._installed_handler)
        logs._installed_handler = None
    root.setLevel(level)
    logging.captureWarnings(False)


@pytest.fixture
def stream() -> io.StringIO:
    return io.StringIO()


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line]


def test_json_format_writes_one_object_per_line_with_every_extra_field(
    stream: io.StringIO,
) -> None:
    logs.configure_logging({"LOG_FORMAT": "json"}, stream=stream)
    log = logging.getLogger("tests.logs")

    log.info("first %s", "message", extra={"service": "orders", "attempt": 2})
    log.warning("second", extra={"call_id_stack": ["a.b.1", "c.d.2"]})

    first, second = json_lines(stream)
    assert first["message"] == "first message"
    assert first["level"] == "INFO"
    assert first["logger"] == "tests.logs"
    assert first["timestamp"].endswith("+00:00")
    assert first["service"] == "orders"
    assert first["attempt"] == 2
    assert second["level"] == "WARNING"
    assert second["call_id_stack"] == ["a.b.1", "c.d.2"]
    assert "service" not in second


def test_json_line_carries_the_exception_text(stream: io.StringIO) -> None:
    logs.configure_logging({"LOG_FORMAT": "json"}, stream=stream)
    try:
        raise ValueError("bad value")
    except ValueError:
        logging.getLogger("tests.logs").exception("failed", extra={"service": "x"})

    (line,) = json_lines(stream)
    assert line["message"] == "failed"
    assert "Traceback" in line["exception"]
    assert "ValueError: bad value" in line["exception"]


def test_json_line_keeps_an_extra_field_named_like_a_core_field(
    stream: io.StringIO,
) -> None:
    logs.configure_logging({"LOG_FORMAT": "json"}, stream=stream)
    logging.getLogger("tests.logs").info("hi", extra={"level": "deep", "obj": object})

    (line,) = json_lines(stream)
    assert line["level"] == "INFO"
    assert line["extra_level"] == "deep"
    assert line["obj"] == str(object)


def test_text_format_appends_extra_fields_as_key_value(stream: io.StringIO) -> None:
    logs.configure_logging({}, stream=stream)
    logging.getLogger("tests.logs").info(
        "worker finished",
        extra={"service": "orders", "detail": "two words", "stack": ["a", "b"]},
    )

    line = stream.getvalue().strip()
    assert " INFO tests.logs: worker finished " in line
    assert line.endswith('service=orders detail="two words" stack=["a","b"]')


def test_log_level_filters_records_below_it(stream: io.StringIO) -> None:
    logs.configure_logging(
        {"LOG_FORMAT": "json", "LOG_LEVEL": "warning"}, stream=stream
    )
    log = logging.getLogger("tests.logs")

    log.info("dropped")
    log.warning("kept")

    assert [line["message"] for line in json_lines(stream)] == ["kept"]


def test_format_and_level_are_read_from_the_environment_without_config(
    stream: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOG_FORMAT", "JSON")
    monkeypatch.setenv("LOG_LEVEL", "ERROR")
    logs.configure_logging({}, stream=stream)
    log = logging.getLogger("tests.logs")

    log.warning("dropped")
    log.error("kept")

    assert [line["message"] for line in json_lines(stream)] == ["kept"]


def test_config_wins_over_the_environment(
    stream: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOG_FORMAT", "json")
    logs.configure_logging({"LOG_FORMAT": "text"}, stream=stream)

    logging.getLogger("tests.logs").warning("plain")

    assert not stream.getvalue().startswith("{")
    assert "WARNING tests.logs: plain" in stream.getvalue()


def test_configuring_twice_replaces_the_handler_instead_of_adding_one(
    stream: io.StringIO,
) -> None:
    logs.configure_logging({"LOG_FORMAT": "json"}, stream=io.StringIO())
    logs.configure_logging({"LOG_FORMAT": "json"}, stream=stream)

    logging.getLogger("tests.logs").warning("once")

    assert len(json_lines(stream)) == 1
    ours = [
        h
        for h in logging.getLogger().handlers
        if isinstance(h.formatter, logs.JsonFormatter)
    ]
    assert len(ours) == 1


@pytest.mark.parametrize(
    "config, key",
    [({"LOG_FORMAT": "xml"}, "LOG_FORMAT"), ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL")],
)
def test_unknown_format_or_level_is_a_configuration_error(
    config: dict[str, Any], key: str
) -> None:
    with pytest.raises(ConfigurationError, match=key):
        logs.configure_logging(config, stream=io.StringIO())


def test_python_warnings_become_log_records(stream: io.StringIO) -> None:
    logs.configure_logging({"LOG_FORMAT": "json"}, stream=stream)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("old api", DeprecationWarning, stacklevel=1)

    (line,) = json_lines(stream)
    assert line["logger"] == "py.warnings"
    assert "DeprecationWarning: old api" in line["message"]


def test_cli_logging_setup_goes_through_configure_logging(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from framework.cli.config import setup_logging

    setup_logging({"LOG_FORMAT": "json"})
    logging.getLogger("tests.logs").warning("via the cli", extra={"service": "cli"})

    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert {"message": "via the cli", "service": "cli"}.items() <= lines[-1].items()


def test_every_worker_logs_exactly_one_json_line_with_its_fields(
    stream: io.StringIO,
) -> None:
    logs.configure_logging({"LOG_FORMAT": "json"}, stream=stream)
    container = ServiceContainer(Service, {})
    container.start()
    try:
        parent = "gateway.place.0"
        with entrypoint_hook(container, "succeed", {"call_id_stack": [parent]}) as hook:
            assert hook(1) == 1
            assert hook(2) == 2
        with entrypoint_hook(container, "refuse") as hook, pytest.raises(Refused):
            hook()
        with entrypoint_hook(container, "crash") as hook, pytest.raises(RuntimeError):
            hook()
        wait_for(lambda: container.active_workers == 0, timeout=5)
    finally:
        container.kill()

    records = [
        line for line in json_lines(stream) if line["logger"] == "framework.workers"
    ]
    assert len(records) == 4
    assert len({record["call_id"] for record in records}) == 4
    for record in records:
        assert record["message"] == "worker finished"
        assert record["level"] == "INFO"
        assert record["service"] == "logs_test_service"
        assert record["call_id"].startswith(
            f"logs_test_service.{record['entrypoint']}."
        )
        assert record["call_id_stack"][-1] == record["call_id"]
        assert isinstance(record["duration_ms"], float) and record["duration_ms"] >= 0
    outcomes = sorted((r["entrypoint"], r["outcome"]) for r in records)
    assert outcomes == [
        ("crash", "error"),
        ("refuse", "expected_error"),
        ("succeed", "success"),
        ("succeed", "success"),
    ]
    succeeded = [r for r in records if r["entrypoint"] == "succeed"]
    assert all(r["call_id_stack"] == [parent, r["call_id"]] for r in succeeded)


PASSWORD = "correct horse battery staple"
TOKEN = "tok-5f2b9c"
FORGED = (
    "2026-11-27 01:54:25,123 INFO framework.workers: worker finished outcome=success"
)


def _run_failing_workers(container: ServiceContainer) -> None:
    with entrypoint_hook(container, "store") as store, pytest.raises(RuntimeError):
        store("ann@example.com", PASSWORD, {"tokens": [TOKEN, "public"]})
    with entrypoint_hook(container, "check") as check, pytest.raises(Refused):
        check("ann@example.com", PASSWORD)
    wait_for(lambda: container.active_workers == 0, timeout=5)


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_a_failed_worker_is_logged_without_its_secrets_or_unexpected_error_text(
    stream: io.StringIO, log_format: str
) -> None:
    logs.configure_logging(
        {"LOG_FORMAT": log_format, "LOG_LEVEL": "DEBUG"}, stream=stream
    )
    container = ServiceContainer(Service, {})
    container.start()
    try:
        _run_failing_workers(container)
    finally:
        container.kill()

    output = stream.getvalue()
    assert PASSWORD not in output and TOKEN not in output
    assert "INSERT failed" not in output  # the unexpected error's text
    assert "no account for ann@example.com" in output  # the expected one's
    assert "test_logs.py" in output and "in store" in output  # its frames
    assert "builtins.RuntimeError (message withheld)" in output


def test_a_failed_worker_record_names_type_call_id_and_redacted_arguments(
    stream: io.StringIO,
) -> None:
    logs.configure_logging({"LOG_FORMAT": "json"}, stream=stream)
    container = ServiceContainer(Service, {})
    container.start()
    try:
        _run_failing_workers(container)
    finally:
        container.kill()

    lines = json_lines(stream)
    errors = {
        line["entrypoint"]: line
        for line in lines
        if line["message"] == "error handling worker"
    }
    finished = {
        line["entrypoint"]: line
        for line in lines
        if line["message"] == "worker finished"
    }
    store, check = errors["store"], errors["check"]
    assert store["level"] == "ERROR"
    assert store["error_type"] == "builtins.RuntimeError"
    assert "error" not in store
    assert store["correlation_id"] == store["call_id"] == finished["store"]["call_id"]
    assert store["call_args"] == {
        "email": "ann@example.com",
        "password": REDACTED,
        "profile": {"tokens": [REDACTED, "public"]},
    }
    assert "Traceback" in store["exception"]
    assert check["level"] == "WARNING"
    assert check["error"] == "no account for ann@example.com"
    assert check["call_args"] == {"email": "ann@example.com", "password": REDACTED}


def test_recorded_arguments_cut_long_strings_and_hide_objects() -> None:
    class Method:
        container = type("C", (), {"service_cls": Service})
        method_name = "check"
        sensitive_arguments = ()

    recorded = logs.recorded_arguments(Method, ("x" * 1000, object()), {})

    assert recorded["email"].startswith("x" * 200)
    assert recorded["email"].endswith("...[800 more characters]")
    assert recorded["password"] == "<object>"
    assert logs.recorded_arguments(Method, (1, 2, 3), {}) == "[not recorded]"


def test_text_format_escapes_line_breaks_so_arguments_cannot_forge_records(
    stream: io.StringIO,
) -> None:
    logs.configure_logging({}, stream=stream)
    log = logging.getLogger("tests.logs")

    log.info("hello %s", f"ann\n{FORGED}")
    log.info("fields", extra={"email": f"x\r\n{FORGED}", "raw": "a\x1b[2Jb"})
    log.info("unicode breaks: %s", f"a\u2028{FORGED}\x85{FORGED}")
    try:
        raise Refused(f"bad email\n{FORGED}")
    except Refused:
        log.exception("refused")

    output = stream.getvalue()
    lines = output.splitlines()
    # A record starts at column 0; continuation lines (the traceback) are indented.
    records = [line for line in lines if not line[:1].isspace()]
    assert len(records) == 4, lines
    assert not any(line.startswith(FORGED) for line in lines)
    assert "\x1b" not in output and "\u2028" not in output and "\x85" not in output
    assert "ann\\n2026" in records[0]
    assert "\\r\\n2026" in records[1] and "a\\x1b[2Jb" in records[1]
    assert "\\u2028" in records[2] and "\\x85" in records[2]
    assert "  Traceback (most recent call last):" in lines
    assert f"  {FORGED}" in lines  # the exception's second line, indented


class LeakyProvider(DependencyProvider):
    """Fails in every hook with a message quoting a secret, as a driver might."""

    def __init__(self, fail_in: str) -> None:
        self.fail_in = fail_in

    def _maybe_fail(self, hook: str) -> None:
        if hook == self.fail_in:
            raise RuntimeError(DRIVER_ERROR.format("ann@example.com", PASSWORD))

    def get_dependency(self, worker_ctx: Any) -> None:
        return None

    def worker_setup(self, worker_ctx: Any) -> None:
        self._maybe_fail("worker_setup")

    def worker_result(self, worker_ctx: Any, result: Any, exc_info: Any) -> None:
        self._maybe_fail("worker_result")

    def worker_teardown(self, worker_ctx: Any) -> None:
        self._maybe_fail("worker_teardown")


@pytest.mark.parametrize(
    ("hook", "message"),
    [
        ("worker_setup", "dependency setup failed"),
        ("worker_result", "worker_result failed"),
        ("worker_teardown", "worker_teardown failed"),
    ],
)
def test_a_failing_dependency_hook_is_logged_without_its_error_text(
    stream: io.StringIO, hook: str, message: str
) -> None:
    class WithLeakyProvider:
        name = "leaky"
        leaky = LeakyProvider(hook)

        @entrypoint(sensitive_arguments="password")
        def check(self, email: str, password: str) -> None:
            pass

    logs.configure_logging({"LOG_FORMAT": "json"}, stream=stream)
    container = ServiceContainer(WithLeakyProvider, {})
    container.start()
    try:
        with entrypoint_hook(container, "check") as check:
            try:
                check("ann@example.com", PASSWORD)
            except RuntimeError:
                pass  # dependency setup failed: the worker fails
        wait_for(lambda: container.active_workers == 0, timeout=5)
    finally:
        container.kill()

    assert PASSWORD not in stream.getvalue()
    assert "INSERT failed" not in stream.getvalue()
    (record,) = [line for line in json_lines(stream) if line["message"] == message]
    assert record["level"] == "ERROR"
    assert record["error_type"] == "builtins.RuntimeError"
    assert record["call_args"] == {"email": "ann@example.com", "password": REDACTED}


# -- records made from a template ------------------------------------------------------


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def captured() -> Iterator[Captured]:
    handler = Captured()
    logger = logging.getLogger("tests.logs.template")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)


FIELDS = {
    "service": "orders",
    "entrypoint": "create",
    "call_id": "orders.create.1",
    "call_id_stack": ["gateway.place.0", "orders.create.1"],
    "duration_ms": 1.25,
    "outcome": "success",
}
# What a template's record may differ in from logging's own for the same call.
VOLATILE = {"created", "msecs", "relativeCreated", "thread", "threadName", "lineno"}


def _log_from_template_then_generically(
    template: logs.RecordTemplate, fields: dict[str, Any]
) -> None:
    template.log(fields)
    template.logger.info(template.message, extra=fields)


def test_a_template_record_has_the_attributes_logging_itself_gives(
    captured: Captured,
) -> None:
    template = logs.RecordTemplate(
        logging.getLogger("tests.logs.template"), logging.INFO, "worker finished"
    )

    for _ in range(2):  # the first record is made generically, the next copied
        _log_from_template_then_generically(template, FIELDS)

    first, generic, copied, generic_again = captured.records
    for ours, theirs in ((first, generic), (copied, generic_again)):
        assert ours.__dict__.keys() == theirs.__dict__.keys()
        differing = {
            key for key in ours.__dict__ if ours.__dict__[key] != theirs.__dict__[key]
        }
        assert differing <= VOLATILE
        assert ours.funcName == "_log_from_template_then_generically"
        assert ours.lineno == theirs.lineno - 1
        assert ours.filename == "test_logs.py"
        assert ours.getMessage() == "worker finished"
        assert abs(ours.created - theirs.created) < 60
        assert abs(ours.relativeCreated - theirs.relativeCreated) < 60_000
        assert ours.msecs == int((ours.created - int(ours.created)) * 1000)
        assert ours.process == theirs.process


@pytest.mark.parametrize("formatter", [logs.TextFormatter(), logs.JsonFormatter()])
def test_a_template_record_is_formatted_as_logging_s_own_would_be(
    captured: Captured, formatter: logging.Formatter
) -> None:
    template = logs.RecordTemplate(
        logging.getLogger("tests.logs.template"), logging.INFO, "worker finished"
    )
    fields = {**FIELDS, "call_id": "two words\nand a forged line"}
    for _ in range(2):
        _log_from_template_then_generically(template, fields)

    for ours, theirs in zip(captured.records[::2], captured.records[1::2], strict=True):
        ours.created, ours.msecs = theirs.created, theirs.msecs
        line = formatter.format(ours)
        assert line == formatter.format(theirs)
        assert "\n" not in line
        assert "orders.create.1" in line


def test_a_template_logs_nothing_below_its_logger_s_level(
    captured: Captured,
) -> None:
    logger = logging.getLogger("tests.logs.template")
    template = logs.RecordTemplate(logger, logging.DEBUG, "detail")
    logger.setLevel(logging.INFO)

    template.log(FIELDS)
    template.log(FIELDS)

    assert captured.records == []


def test_a_template_goes_through_a_custom_record_factory(
    captured: Captured,
) -> None:
    original = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = original(*args, **kwargs)
        record.tenant = "acme"
        return record

    template = logs.RecordTemplate(
        logging.getLogger("tests.logs.template"), logging.INFO, "worker finished"
    )
    template.log(FIELDS)  # learnt with the standard factory
    logging.setLogRecordFactory(factory)
    try:
        template.log(FIELDS)
        template.log(FIELDS)
    finally:
        logging.setLogRecordFactory(original)

    assert [getattr(r, "tenant", None) for r in captured.records] == [
        None,
        "acme",
        "acme",
    ]


def test_a_template_record_reaches_the_logger_s_filters(captured: Captured) -> None:
    logger = logging.getLogger("tests.logs.template")
    template = logs.RecordTemplate(logger, logging.INFO, "worker finished")

    def drop_errors(record: logging.LogRecord) -> bool:
        return getattr(record, "outcome", None) != "error"

    logger.addFilter(drop_errors)
    try:
        for outcome in ("success", "error", "success", "error"):
            template.log({**FIELDS, "outcome": outcome})
    finally:
        logger.removeFilter(drop_errors)

    assert [r.outcome for r in captured.records] == ["success", "success"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "created",
    [
        1764558245.0,
        1764558245.0004999,
        1764558245.0005,
        1764558245.123456,
        1764558245.9994999,
        1764558245.9999996,  # rounds into the next second
        1764558246.5,
        1764558246.7,  # the same second again: the cached part
        0.25,
    ],
)
def test_json_timestamp_is_the_utc_iso_time_to_the_millisecond(created: float) -> None:
    formatter = logs.JsonFormatter()
    record = logging.makeLogRecord({"msg": "m", "created": created})

    for _ in range(2):
        entry = json.loads(formatter.format(record))
        assert entry["timestamp"] == datetime.fromtimestamp(created, tz=UTC).isoformat(
            timespec="milliseconds"
        )


def test_text_time_is_logging_s_default_time_for_every_record() -> None:
    ours, theirs = logs.TextFormatter(), logging.Formatter()
    start = 1764558245.0
    for offset in (0.0, 0.001, 0.5, 0.999, 1.0, 1.2, 61.7, 3600.05, 0.3):
        record = logging.makeLogRecord({"msg": "m"})
        record.created = start + offset
        record.msecs = int(offset * 1000 % 1000)
        assert ours.formatTime(record) == theirs.formatTime(record)
    record.created, record.msecs = start, 0.0
    assert ours.formatTime(record, "%H:%M") == theirs.formatTime(record, "%H:%M")


def test_a_text_value_is_quoted_exactly_when_it_holds_whitespace_a_quote_or_equals(
    stream: io.StringIO,
) -> None:
    logs.configure_logging({}, stream=stream)
    log = logging.getLogger("tests.logs")
    every_character = "".join(
        chr(code) for code in range(0x110000) if not 0xD800 <= code <= 0xDFFF
    )
    quoted = {char for char in every_character if logs._text_value(char) != char}
    assert quoted == {c for c in every_character if c.isspace() or c in '"='}

    log.info("m", extra={"a": "x\u00a0y", "b": "plain", "c": "k=v", "d": ""})

    line = stream.getvalue().strip()
    assert line.endswith('a="x\u00a0y" b=plain c="k=v" d=""')


def test_worker_finished_text_line_keeps_its_shape_and_escapes_forged_call_ids(
    stream: io.StringIO,
) -> None:
    logs.configure_logging({}, stream=stream)
    container = ServiceContainer(Service, {})
    container.start()
    try:
        forged_parent = f"gateway.place.0\n{FORGED}"
        for _ in range(2):
            with entrypoint_hook(
                container, "succeed", {"call_id_stack": [forged_parent]}
            ) as hook:
                assert hook(1) == 1
        wait_for(lambda: container.active_workers == 0, timeout=5)
    finally:
        container.kill()

    lines = stream.getvalue().splitlines()
    finished = [line for line in lines if "framework.workers" in line]
    assert len(finished) == 2, lines
    assert not any(line.startswith(FORGED) for line in lines)
    for line in finished:
        assert re.fullmatch(
            r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO framework\.workers: "
            r"worker finished service=logs_test_service entrypoint=succeed "
            r"call_id=logs_test_service\.succeed\.\S+ "
            r'call_id_stack=\["gateway\.place\.0\\n2026-11-27 [^"]*",'
            r'"logs_test_service\.succeed\.\S+"\] '
            r"duration_ms=\d+\.\d+ outcome=success",
            line,
        ), line
