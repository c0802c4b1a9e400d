"""How a service's logs look: JSON lines for machines, or readable text for people.

``configure_logging(config)`` is what ``framework run`` calls (unless the config has
a ``LOGGING`` dictConfig, which wins). Two settings, each read from the config
first and from the environment variable of the same name second::

    LOG_FORMAT: json      # one JSON object per line; default "text"
    LOG_LEVEL: DEBUG      # root level; default INFO

Both formats carry every structured field a record was logged with
(``log.info("...", extra={...})``). A JSON line::

    {"timestamp": "2026-11-27T01:54:25.123+00:00", "level": "INFO",
     "logger": "framework.workers", "message": "worker finished",
     "service": "orders", "entrypoint": "create", "call_id": "orders.create.<uuid>",
     "call_id_stack": ["gateway.place.<uuid>", "orders.create.<uuid>"],
     "duration_ms": 12.4, "outcome": "success"}

plus ``"exception"`` (the formatted traceback) when one was logged. The same record
as text::

    2026-11-27 01:54:25,123 INFO framework.workers: worker finished service=orders
    entrypoint=create call_id=orders.create.<uuid> call_id_stack=[...] ...

The per-worker record
---------------------
Every worker a container runs ends with exactly one INFO record ``worker finished``
on the logger ``framework.workers`` (``ServiceContainer._log_worker``), after its
result was handled and its dependencies torn down, with the fields:

``service``, ``entrypoint`` (the method name), ``call_id``, ``call_id_stack``
(the chain of calls that led here, this one last), ``duration_ms`` (the whole
worker: dependency setup, the method, result handling, teardown) and ``outcome``:
``success``, ``expected_error`` (an exception the entrypoint declared in
``expected_exceptions``) or ``error``. A worker killed mid-call (container killed,
or drain deadline passed) logs no such record. Set the ``framework.workers``
logger to WARNING to turn these records off; the container then skips building them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Any

from framework.constants import (
    DEFAULT_LOG_FORMAT,
    DEFAULT_LOG_LEVEL,
    LOG_FORMAT_CONFIG_KEY,
    LOG_LEVEL_CONFIG_KEY,
)
from framework.exceptions import ConfigurationError

log = logging.getLogger(__name__)

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has; anything else on a record came from `extra`.
# `message` and `asctime` are added by formatters, `taskName` by Python >= 3.12.
_RECORD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "taskName",
}

# The handler configure_logging installed, so that calling it again replaces it
# instead of duplicating every line.
_installed_handler: logging.Handler | None = None


def configure_logging(
    config: Mapping[str, Any] | None = None, *, stream: IO[str] | None = None
) -> logging.Handler:
    """Send the root logger's records to ``stream`` (stderr) as ``LOG_FORMAT`` says.

    Idempotent: a second call replaces the handler the first one installed. Other
    handlers (a test runner's, say) are left alone. Raises ``ConfigurationError``
    for an unknown format or level. Returns the installed handler.
    """
    global _installed_handler
    config = config or {}
    log_format = _setting(config, LOG_FORMAT_CONFIG_KEY, DEFAULT_LOG_FORMAT).lower()
    if log_format not in LOG_FORMATS:
        raise ConfigurationError(
            f"{LOG_FORMAT_CONFIG_KEY} must be one of {', '.join(LOG_FORMATS)}, "
            f"not {log_format!r}"
        )
    level = parse_level(_setting(config, LOG_LEVEL_CONFIG_KEY, DEFAULT_LOG_LEVEL))

    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    if _installed_handler is not None:
        root.removeHandler(_installed_handler)
    root.addHandler(handler)
    root.setLevel(level)
    # Python warnings (deprecations, say) would otherwise go to stderr as bare
    # text, one more format in a stream a log pipeline parses as JSON lines.
    logging.captureWarnings(True)
    _installed_handler = handler
    return handler


def _setting(config: Mapping[str, Any], key: str, default: str) -> str:
    value = config.get(key)
    if value is None or value == "":
        value = os.environ.get(key) or default
    return str(value)


def parse_level(value: str | int) -> int:
    """``"debug"``, ``"INFO"``, ``"10"`` or ``10`` → the logging level number."""
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    level = logging.getLevelName(text.upper())
    if not isinstance(level, int):
        raise ConfigurationError(
            f"{LOG_LEVEL_CONFIG_KEY} must be a level name (DEBUG, INFO, WARNING, "
            f"ERROR, CRITICAL) or number, not {value!r}"
        )
    return level


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields a record was logged with (its ``extra``)."""
    return {
        key: value
        for key, value in record.__dict__.items()
        if key not in _RECORD_ATTRIBUTES and not key.startswith("_")
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per record: timestamp, level, logger, message, extra fields.

    Extra fields that are not JSON types are written as their ``str()``. An extra
    field named like a core one (``level``, say) is kept as ``extra_level`` rather
    than overwrite it.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, tz=UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in extra_fields(record).items():
            entry[f"extra_{key}" if key in entry else key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``<time> <LEVEL> <logger>: <message> key=value ...``, traceback below."""

    def __init__(self, fmt: str = TEXT_FORMAT) -> None:
        super().__init__(fmt)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        line = super().formatMessage(record)
        fields = extra_fields(record)
        if not fields:
            return line
        pairs = " ".join(f"{key}={_text_value(value)}" for key, value in fields.items())
        return f"{line} {pairs}"


def _text_value(value: Any) -> str:
    # Bare when unambiguous; otherwise JSON, so a value with spaces or an `=`
    # still reads as one field.
    if isinstance(value, str):
        if value and not any(c.isspace() or c in '"=' for c in value):
            return value
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool | int | float) or value is None:
        return str(value)
    return json.dumps(value, default=str, ensure_ascii=False, separators=(",", ":"))
