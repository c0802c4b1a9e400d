"""``framework.logs``: JSON lines and key=value text, and the per-worker record.

Output goes to an in-memory stream and is parsed back, so every assertion is on
what an operator's log pipeline would read.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

from framework import logs
from framework.containers import ServiceContainer
from framework.exceptions import ConfigurationError
from framework.extensions import Entrypoint
from framework.testing.services import entrypoint_hook
from tests.helpers import wait_for

entrypoint = Entrypoint.decorator


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
