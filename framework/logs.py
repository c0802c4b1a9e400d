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
The record is made from a ``RecordTemplate`` (a copy of the first one's constant
attributes, not logging's generic path: it is written for every request); in a
monkey-patched process its ``threadName`` is ``GreenThread``.

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
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Any

from framework import concurrency
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


# The attributes that differ between two records logged from the same place.
_PER_RECORD_ATTRIBUTES = frozenset(
    {"created", "msecs", "relativeCreated", "thread", "threadName", "process"}
)

# The threadName of a record a RecordTemplate makes in a monkey-patched process.
# There, threading.current_thread() builds a wrapper the first time a green
# thread asks (about 8 µs, and every worker is a new green thread) only to name
# it "GreenThread-<n>", a counter nothing else refers to; the record's ``thread``
# (the green thread's id) and its call id are what identify a worker.
GREEN_THREAD_NAME = "GreenThread"

_new_record = logging.LogRecord.__new__


class RecordTemplate:
    """Records of one message at one level, logged from one place in the code
    with different structured fields each time, for a fraction of the cost of
    ``logger.info(message, extra=fields)``.

    The generic path finds the caller's frame (``findCaller``) and builds every
    attribute of the record again (``makeRecord``), for a few microseconds
    each: a record per request or per worker makes that a visible share of
    the service's CPU. Here the first record is made that way, and the
    attributes that cannot differ for the same place (logger, level, message,
    source file, line and function, process name) are kept; each later record
    is a copy of them plus its time, thread and process ids and ``fields``.
    They are plain ``LogRecord`` objects that go through the logger's filters
    and handlers like any other, and are formatted only by enabled handlers.

    One template per place that logs (the source location of its first record
    is every record's). ``fields`` must not be named like record attributes
    (``makeRecord`` refuses those on the first record). The generic path is
    taken whenever it could give a different record: a record factory set
    with ``logging.setLogRecordFactory`` or a logger class with its own
    ``makeRecord``.
    """

    def __init__(self, logger: logging.Logger, level: int, message: str) -> None:
        self.logger = logger
        self.level = level
        self.message = message
        self._constant: dict[str, Any] | None = None
        self._logging_started = 0.0  # what relativeCreated counts from

    def log(self, fields: Mapping[str, Any], *, stacklevel: int = 1) -> None:
        """Log the message with ``fields`` as its extra fields, if the logger is
        enabled for the level. ``stacklevel`` is logging's: 1 makes the caller
        of this method the record's source."""
        logger = self.logger
        if not logger.isEnabledFor(self.level):
            return
        if self._constant is None or not _standard_records(logger):
            # findCaller's frame count from _generic_record: itself, this
            # method, then the caller.
            record = self._generic_record(fields, stacklevel + 2)
        else:
            record = self._copy(self._constant, fields)
        logger.handle(record)

    def _generic_record(
        self, fields: Mapping[str, Any], stacklevel: int
    ) -> logging.LogRecord:
        logger = self.logger
        filename, lineno, function, _ = logger.findCaller(stacklevel=stacklevel)
        record = logger.makeRecord(
            logger.name,
            self.level,
            filename,
            lineno,
            self.message,
            (),
            None,
            function,
            dict(fields),
        )
        if self._constant is None and _standard_records(logger):
            self._constant = {
                key: value
                for key, value in record.__dict__.items()
                if key not in _PER_RECORD_ATTRIBUTES and key not in fields
            }
            self._logging_started = record.created - record.relativeCreated / 1000
        return record

    def _copy(
        self, constant: dict[str, Any], fields: Mapping[str, Any]
    ) -> logging.LogRecord:
        record = _new_record(logging.LogRecord)
        attributes = record.__dict__
        attributes.update(constant)
        # As LogRecord.__init__ sets them.
        created = time.time()
        attributes["created"] = created
        attributes["msecs"] = int((created - int(created)) * 1000) + 0.0
        attributes["relativeCreated"] = (created - self._logging_started) * 1000
        if logging.logThreads:
            attributes["thread"] = threading.get_ident()
            attributes["threadName"] = (
                GREEN_THREAD_NAME
                if concurrency.is_monkey_patched()
                else threading.current_thread().name
            )
        else:
            attributes["thread"] = attributes["threadName"] = None
        attributes["process"] = os.getpid() if logging.logProcesses else None
        attributes.update(fields)
        return record


def _standard_records(logger: logging.Logger) -> bool:
    return (
        logging.getLogRecordFactory() is logging.LogRecord
        and type(logger).makeRecord is logging.Logger.makeRecord
    )


class JsonFormatter(logging.Formatter):
    """One JSON object per record: timestamp, level, logger, message, extra fields.

    Extra fields that are not JSON types are written as their ``str()``. An extra
    field named like a core one (``level``, say) is kept as ``extra_level`` rather
    than overwrite it.
    """

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._second_text = ""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": self._timestamp(record.created),
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
        return _JSON.encode(entry)

    def _timestamp(self, created: float) -> str:
        # datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds"),
        # with the part up to the second built once a second: a service writing
        # a record per request would otherwise build a datetime for each.
        second, micro = _split_timestamp(created)
        if second != self._second:
            self._second_text = datetime.fromtimestamp(second, tz=UTC).strftime(
                "%Y-%m-%dT%H:%M:%S"
            )
            self._second = second
        return f"{self._second_text}.{micro // 1000:03d}+00:00"


def _split_timestamp(created: float) -> tuple[int, int]:
    # Whole seconds and microseconds, rounded as datetime.fromtimestamp rounds
    # (half to even, with a carry into the next second).
    second = int(created)
    micro = round((created - second) * 1e6)
    if micro >= 1_000_000:
        second, micro = second + 1, micro - 1_000_000
    return second, micro


# Built once: json.dumps with any non-default option builds an encoder per call.
_JSON = json.JSONEncoder(default=str, ensure_ascii=False)
_COMPACT_JSON = json.JSONEncoder(default=str, ensure_ascii=False, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """``<time> <LEVEL> <logger>: <message> key=value ...``, traceback below."""

    def __init__(self, fmt: str = TEXT_FORMAT) -> None:
        super().__init__(fmt)
        self._second = -1
        self._second_text = ""

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

    def formatTime(  # noqa: N802 - logging's name
        self, record: logging.LogRecord, datefmt: str | None = None
    ) -> str:
        if (
            datefmt is not None
            or self.converter is not time.localtime
            or self.default_msec_format is None
        ):
            return super().formatTime(record, datefmt)
        # logging's default "%Y-%m-%d %H:%M:%S,mmm" in local time, the part up
        # to the second formatted once a second rather than for every record.
        second = int(record.created)
        if second != self._second:
            self._second_text = time.strftime(
                self.default_time_format, time.localtime(second)
            )
            self._second = second
        return self.default_msec_format % (self._second_text, record.msecs)

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


# A string holding one of these is written as JSON, so that it still reads as
# one field ("a b" bare would read as a field "a" and a stray word).
_NEEDS_QUOTES = re.compile(r'[\s"=]')


def _text_value(value: Any) -> str:
    # Bare when unambiguous; otherwise JSON, so a value with spaces or an `=`
    # still reads as one field.
    if isinstance(value, str):
        if value and _NEEDS_QUOTES.search(value) is None:
            return value
        return _JSON.encode(value)
    if isinstance(value, bool | int | float) or value is None:
        return str(value)
    return _COMPACT_JSON.encode(value)


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
