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

Errors
------
A failed worker also logs ``error handling worker`` (``log_worker_error``) with
``service``, ``entrypoint``, ``call_id``, ``error_type`` and ``call_args`` (the
arguments by name, the entrypoint's ``sensitive_arguments`` masked, long strings
cut, objects shown as their type). An expected error (see
``framework.exceptions.is_expected``) is a WARNING with its message in ``error``;
an unexpected one is an ERROR whose ``exception`` holds the stack frames and
exception types only: its message may quote anything (SQL parameters, a password
hash), so it is never written. The ``call_id`` is the correlation id the caller
was given.

In the text format a record is one line: control characters and line breaks in
the message or fields are escaped (``\\n``), and the lines of a traceback are
indented, so no argument can forge a record.
"""

from __future__ import annotations

import json
import logging
import os
import re
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
from framework.exceptions import (
    ConfigurationError,
    format_exception_frames,
    get_module_path,
    is_expected,
)
from framework.utils import get_redacted_args

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

    def format(self, record: logging.LogRecord) -> str:
        # logging.Formatter.format, with the traceback and stack indented.
        record.message = record.getMessage()
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        text = self.formatMessage(record)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text = f"{text}\n{_indent_block(record.exc_text)}"
        if record.stack_info:
            text = f"{text}\n{_indent_block(self.formatStack(record.stack_info))}"
        return text

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        line = super().formatMessage(record)
        fields = extra_fields(record)
        if fields:
            pairs = " ".join(
                f"{key}={_text_value(value)}" for key, value in fields.items()
            )
            line = f"{line} {pairs}"
        return escape_control_characters(line)


# Control characters, and what str.splitlines() or a terminal treats as a line
# break: written escaped in the text format so one record stays one line.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape_control(match: re.Match[str]) -> str:
    char = match.group()
    if char == "\n":
        return "\\n"
    if char == "\r":
        return "\\r"
    if char == "\t":
        return "\\t"
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape_control_characters(text: str) -> str:
    """``text`` with its control characters and line breaks written as escapes."""
    if _CONTROL.search(text) is None:
        return text
    return _CONTROL.sub(_escape_control, text)


def _indent_block(text: str) -> str:
    # A record's first line starts at column 0 with its timestamp; every further
    # line (a traceback) starts with whitespace, so an exception message holding
    # a line break cannot pass for a record of its own.
    lines = []
    for line in text.splitlines():
        line = escape_control_characters(line)
        lines.append(line if line[:1].isspace() else f"  {line}")
    return "\n".join(lines)


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


# -- errors -----------------------------------------------------------------------------

_MAX_RECORDED_STRING = 200


def log_error(
    logger: logging.Logger,
    message: str,
    exc: BaseException,
    *,
    expected: bool,
    correlation_id: str | None,
    fields: Mapping[str, Any] | None = None,
    stacklevel: int = 1,
) -> None:
    """Log a failure without leaking what an unexpected one says.

    An expected error is a WARNING with its message (``error``). An unexpected
    one is an ERROR with its type, the correlation id and its stack frames in
    ``exception`` (``format_exception_frames``), never its message text.
    """
    level = logging.WARNING if expected else logging.ERROR
    if not logger.isEnabledFor(level):
        return
    extra = {
        **(fields or {}),
        "correlation_id": correlation_id,
        "error_type": get_module_path(type(exc)),
    }
    if expected:
        extra["error"] = str(exc)
        logger.warning(message, extra=extra, stacklevel=stacklevel + 1)
        return
    filename, lineno, function, _ = logger.findCaller(stacklevel=stacklevel + 1)
    record = logger.makeRecord(
        logger.name, level, filename, lineno, message, (), None, function, extra
    )
    # Pre-rendered: every formatter (ours or a dictConfig's) writes exc_text
    # as it is when the record carries no exc_info.
    record.exc_text = format_exception_frames(exc)
    logger.handle(record)


def log_worker_error(
    logger: logging.Logger,
    worker_ctx: Any,
    exc: BaseException,
    message: str = "error handling worker",
    fields: Mapping[str, Any] | None = None,
) -> None:
    """``log_error`` for a worker whose method (or one of whose dependency hooks:
    say so in ``message``) raised, with its redacted arguments."""
    entrypoint = worker_ctx.entrypoint
    expected = is_expected(exc, entrypoint.expected_exceptions)
    if not logger.isEnabledFor(logging.WARNING if expected else logging.ERROR):
        return  # spare copying and redacting the arguments
    log_error(
        logger,
        message,
        exc,
        expected=expected,
        correlation_id=worker_ctx.call_id,
        fields={
            **(fields or {}),
            "service": worker_ctx.service_name,
            "entrypoint": entrypoint.method_name,
            "call_id": worker_ctx.call_id,
            "call_args": recorded_arguments(
                entrypoint, worker_ctx.args, worker_ctx.kwargs
            ),
        },
        stacklevel=2,
    )


def recorded_arguments(entrypoint: Any, args: Any, kwargs: Any) -> Any:
    """A call's arguments as a log may record them: by name, the entrypoint's
    ``sensitive_arguments`` masked, strings over 200 characters cut, and any
    other object shown as its type name (its ``str`` could say anything)."""
    try:
        redacted = get_redacted_args(entrypoint, *args, **kwargs)
    except Exception:
        # Unbindable (or an odd entrypoint): nothing is safer than a guess.
        return "[not recorded]"
    return _summarise(redacted)


def _summarise(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): _summarise(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_summarise(item) for item in value]
    if isinstance(value, str):
        if len(value) > _MAX_RECORDED_STRING:
            cut = len(value) - _MAX_RECORDED_STRING
            return f"{value[:_MAX_RECORDED_STRING]}...[{cut} more characters]"
        return value
    if value is None or isinstance(value, bool | int | float):
        return value
    return f"<{type(value).__name__}>"
