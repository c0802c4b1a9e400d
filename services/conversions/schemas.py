"""What goes in and out of the conversions service: its published contract.

Payloads are plain JSON types (ids are UUID strings, timestamps ISO 8601 in UTC),
declared once here as pydantic v2 models: the service validates with them, and the
web service generates its OpenAPI document from them.

Conversion options are nested: ``{"read": {...}, "write": {...}, "columns": [...],
"rename": {...}}``. ``read`` applies to the input format, ``write`` to the target
format; an option that does not apply to the format at hand is refused (see
``FORMATS`` and ``parse_options``), never silently ignored.
"""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.conversions.exceptions import InvalidOptions, UnsupportedConversion

__all__ = [
    "CONVERSION_CANCELLED",
    "CONVERSION_EVENTS",
    "CONVERSION_FAILED",
    "CONVERSION_PROGRESS",
    "CONVERSION_QUEUED",
    "CONVERSION_STARTED",
    "CONVERSION_SUCCEEDED",
    "COUNT_MAX_AGE",
    "DEFAULT_PER_PAGE",
    "FINISHED_STATES",
    "FORMATS",
    "FORMAT_EXTENSIONS",
    "JOB_STATES",
    "MAX_PER_PAGE",
    "STATE_CANCELLED",
    "STATE_FAILED",
    "STATE_QUEUED",
    "STATE_RUNNING",
    "STATE_SUCCEEDED",
    "ConversionOptions",
    "FilePayload",
    "FormatInfo",
    "FormatsPayload",
    "JobEvent",
    "JobInput",
    "JobOutput",
    "JobPage",
    "JobPayload",
    "JobProgress",
    "ReadOptions",
    "WriteOptions",
    "encode_cursor",
    "formats_payload",
    "parse_cursor",
    "parse_options",
    "supported_pairs",
]

# -- job states --------------------------------------------------------------------

STATE_QUEUED = "queued"
STATE_RUNNING = "running"
STATE_SUCCEEDED = "succeeded"
STATE_FAILED = "failed"
STATE_CANCELLED = "cancelled"
JOB_STATES = (
    STATE_QUEUED,
    STATE_RUNNING,
    STATE_SUCCEEDED,
    STATE_FAILED,
    STATE_CANCELLED,
)
FINISHED_STATES = (STATE_SUCCEEDED, STATE_FAILED, STATE_CANCELLED)
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]

# -- events (type names on the ``conversions.events`` exchange), body {"job": ...} --

CONVERSION_QUEUED = "conversion_queued"
CONVERSION_STARTED = "conversion_started"
CONVERSION_PROGRESS = "conversion_progress"
CONVERSION_SUCCEEDED = "conversion_succeeded"
CONVERSION_FAILED = "conversion_failed"
CONVERSION_CANCELLED = "conversion_cancelled"
CONVERSION_EVENTS = (
    CONVERSION_QUEUED,
    CONVERSION_STARTED,
    CONVERSION_PROGRESS,
    CONVERSION_SUCCEEDED,
    CONVERSION_FAILED,
    CONVERSION_CANCELLED,
)

DEFAULT_PER_PAGE = 20
MAX_PER_PAGE = 100
# An ``after`` cursor: base64 of an ISO timestamp and a UUID, well under this.
CURSOR_MAX_LENGTH = 200
# A list's total is counted at most this often (seconds) by each replica.
COUNT_MAX_AGE = 1.0

# -- formats and their options -------------------------------------------------------

FormatName = Literal["csv", "tsv", "ndjson", "json", "parquet", "arrow", "xlsx"]

# Which read/write options each format takes, and the values an option allows
# (None: any value of the option's type).
FORMATS: dict[str, dict[str, Any]] = {
    "csv": {
        "title": "CSV",
        "read": {
            "delimiter": None,
            "header": None,
            "encoding": ["utf-8", "latin-1"],
            "null_values": None,
            "quote_char": None,
            "compression": ["auto", "none", "gzip", "zstd"],
            "parse_dates": None,
        },
        "write": {"delimiter": None, "header": None, "null_value": None},
    },
    "tsv": {
        "title": "TSV (tab-separated)",
        "read": {
            "header": None,
            "encoding": ["utf-8", "latin-1"],
            "null_values": None,
            "compression": ["auto", "none", "gzip", "zstd"],
            "parse_dates": None,
        },
        "write": {"header": None, "null_value": None},
    },
    "ndjson": {
        "title": "NDJSON (one JSON object per line)",
        "read": {"compression": ["auto", "none", "gzip", "zstd"]},
        "write": {},
    },
    "json": {"title": "JSON (an array of objects)", "read": {}, "write": {}},
    "parquet": {
        "title": "Parquet",
        "read": {},
        "write": {"compression": ["zstd", "snappy", "none"]},
    },
    "arrow": {
        "title": "Arrow IPC (Feather v2)",
        "read": {},
        "write": {"compression": ["none", "zstd", "lz4"]},
    },
    "xlsx": {"title": "Excel (XLSX)", "read": {"sheet": None}, "write": {}},
}

# File name endings recognised by ``register_file``, longest first.
FORMAT_EXTENSIONS: dict[str, str] = {
    ".csv.gz": "csv",
    ".csv.zst": "csv",
    ".tsv.gz": "tsv",
    ".tsv.zst": "tsv",
    ".ndjson.gz": "ndjson",
    ".ndjson.zst": "ndjson",
    ".jsonl.gz": "ndjson",
    ".jsonl.zst": "ndjson",
    ".csv": "csv",
    ".txt": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".ndjson": "ndjson",
    ".jsonl": "ndjson",
    ".json": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".arrow": "arrow",
    ".feather": "arrow",
    ".ipc": "arrow",
    ".xlsx": "xlsx",
}

# The XLSX format's own limit: a sheet has at most this many rows (header included).
XLSX_MAX_ROWS = 1_048_576


def supported_pairs() -> list[tuple[str, str]]:
    """Every (source, target) conversion: any format to any other.

    A format to itself is offered too where options can differ (re-delimiting a
    CSV, re-compressing Parquet), which is every format with write options.
    """
    return [
        (source, target)
        for source in FORMATS
        for target in FORMATS
        if source != target or FORMATS[target]["write"]
    ]


class ReadOptions(BaseModel):
    """How to read the input. Defaults suit a UTF-8, comma-separated CSV with a header."""

    model_config = ConfigDict(extra="forbid")

    delimiter: str | None = Field(default=None, min_length=1, max_length=1)
    header: bool = True
    encoding: Literal["utf-8", "latin-1"] = "utf-8"
    null_values: list[str] = Field(default_factory=list, max_length=100)
    quote_char: str = Field(default='"', min_length=1, max_length=1)
    # "auto": from the file name (.gz, .zst), else from the file's first bytes.
    compression: Literal["auto", "none", "gzip", "zstd"] = "auto"
    sheet: str | None = Field(default=None, min_length=1, max_length=31)
    # Read ISO dates and datetimes in text as typed values (CSV, TSV). Off by
    # default: it costs about a third more time on a date-heavy file.
    parse_dates: bool = False


class WriteOptions(BaseModel):
    """How to write the output; ``compression`` defaults per format (Parquet: zstd)."""

    model_config = ConfigDict(extra="forbid")

    delimiter: str | None = Field(default=None, min_length=1, max_length=1)
    header: bool = True
    null_value: str = Field(default="", max_length=100)
    compression: Literal["zstd", "snappy", "lz4", "none"] | None = None


class ConversionOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    read: ReadOptions = Field(default_factory=ReadOptions)
    write: WriteOptions = Field(default_factory=WriteOptions)
    # Columns to keep, in this order (names as read); None keeps all.
    columns: list[str] | None = Field(default=None, min_length=1, max_length=10_000)
    # Old name -> new name, applied after the selection.
    rename: dict[str, str] = Field(default_factory=dict, max_length=10_000)


def parse_options(
    source_format: str, target_format: str, options: Any
) -> ConversionOptions:
    """Validated options for this conversion, or ``InvalidOptions`` listing every
    bad field (``UnsupportedConversion`` for an unknown format or pair)."""
    if target_format not in FORMATS:
        raise UnsupportedConversion(
            f"unknown target format {target_format!r}; supported: {', '.join(FORMATS)}"
        )
    if source_format not in FORMATS:
        raise UnsupportedConversion(f"unknown input format {source_format!r}")
    if (source_format, target_format) not in supported_pairs():
        raise UnsupportedConversion(
            f"converting {source_format} to {target_format} is not supported"
        )
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise InvalidOptions("invalid options", {"options": "must be an object"})
    try:
        parsed = ConversionOptions.model_validate(options)
    except ValidationError as exc:
        raise InvalidOptions("invalid options", _errors(exc)) from None
    errors: dict[str, str] = {}
    for side, fmt in (("read", source_format), ("write", target_format)):
        given = getattr(parsed, side).model_fields_set
        allowed = FORMATS[fmt][side]
        for name in sorted(given):
            value = getattr(getattr(parsed, side), name)
            if name not in allowed:
                taken = ", ".join(allowed) or "none"
                errors[f"{side}.{name}"] = (
                    f"does not apply to {fmt} {'input' if side == 'read' else 'output'}"
                    f" (options it takes: {taken})"
                )
            elif allowed[name] is not None and value not in allowed[name]:
                errors[f"{side}.{name}"] = (
                    f"must be one of {', '.join(map(str, allowed[name]))} for {fmt}"
                )
    if parsed.columns is not None and len(set(parsed.columns)) != len(parsed.columns):
        errors["columns"] = "lists a column twice"
    renamed = list(parsed.rename.values())
    if len(set(renamed)) != len(renamed) or any(not name for name in renamed):
        errors["rename"] = "new names must be distinct and not empty"
    if errors:
        raise InvalidOptions("invalid options", errors)
    return parsed


def _errors(exc: ValidationError) -> dict[str, str]:
    errors: dict[str, str] = {}
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "options"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown option"
        errors.setdefault(field, message)
    return errors


# -- payloads ------------------------------------------------------------------------


class FormatInfo(BaseModel):
    name: str
    title: str
    read_options: dict[str, list[str] | None]  # option -> allowed values (None: any)
    write_options: dict[str, list[str] | None]
    extensions: list[str]


class FormatsPayload(BaseModel):
    formats: list[FormatInfo]
    pairs: list[tuple[str, str]]  # (source, target)


def formats_payload() -> dict[str, Any]:
    """What ``formats()`` returns."""
    formats = [
        FormatInfo(
            name=name,
            title=spec["title"],
            read_options=spec["read"],
            write_options=spec["write"],
            extensions=[ext for ext, fmt in FORMAT_EXTENSIONS.items() if fmt == name],
        )
        for name, spec in FORMATS.items()
    ]
    return FormatsPayload(formats=formats, pairs=supported_pairs()).model_dump(
        mode="json"
    )


class FilePayload(BaseModel):
    id: str
    name: str
    size: int
    format: str
    owner: int | None
    created_at: str
    # Only in ``get_file``'s answer: where the bytes are in the shared storage.
    storage_key: str | None = None


class JobInput(BaseModel):
    file_id: str
    name: str
    format: str
    size: int


class JobOutput(BaseModel):
    name: str
    format: str
    size: int
    rows: int | None
    storage_key: str


class JobProgress(BaseModel):
    bytes: int = 0  # input bytes read so far
    rows: int | None = None  # rows written so far, when the engine can tell
    percent: float | None = None  # 0-100, when the input size allows an estimate


class JobPayload(BaseModel):
    id: str
    state: JobState
    owner: int | None
    input: JobInput
    target_format: str
    options: dict[str, Any]
    output: JobOutput | None
    progress: JobProgress
    attempts: int
    heartbeat_at: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    error: str | None  # a human message for a failed job; never internal details


class JobPage(BaseModel):
    items: list[JobPayload]
    # Every job under the filter, counted at most COUNT_MAX_AGE seconds ago by
    # the replica answering (exact at once after a change made through it).
    total: int
    page: int
    per_page: int
    # Pass it back as ``after`` for the next page: it starts right after this
    # page's last job, whatever was added or removed before it meanwhile. None
    # on the last page.
    next_cursor: str | None = None


class JobEvent(BaseModel):
    """The body of every conversion event."""

    job: JobPayload


# -- validated input ---------------------------------------------------------------

NAME_MAX_LENGTH = 255
_CONTENT_TYPES = {
    "text/csv": "csv",
    "application/csv": "csv",
    "text/tab-separated-values": "tsv",
    "application/x-ndjson": "ndjson",
    "application/jsonl": "ndjson",
    "application/json": "json",
    "application/vnd.apache.parquet": "parquet",
    "application/vnd.apache.arrow.file": "arrow",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": "xlsx",
}


def clean_name(name: Any) -> str:
    """A display name: the last path component, printable, at most 255 characters.

    Only ever shown; storage keys are generated, never derived from it.
    """
    if not isinstance(name, str):
        raise InvalidOptions("invalid file", {"name": "must be a string"})
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip()
    if not base or base in (".", ".."):
        raise InvalidOptions("invalid file", {"name": "must not be empty"})
    return base[-NAME_MAX_LENGTH:]


def detect_format(name: str, head: bytes, content_type: str | None = None) -> str:
    """The format of a file from its name, else its declared type, else its bytes."""
    lowered = name.lower()
    for extension, fmt in FORMAT_EXTENSIONS.items():
        if lowered.endswith(extension):
            return fmt
    if content_type:
        declared = _CONTENT_TYPES.get(content_type.split(";")[0].strip().lower())
        if declared:
            return declared
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.startswith(b"ARROW1"):
        return "arrow"
    if head.startswith(b"PK\x03\x04"):
        return "xlsx"
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if stripped.startswith(b"["):
        return "json"
    if stripped.startswith(b"{"):
        return "ndjson"
    first_line = head.split(b"\n", 1)[0]
    if first_line.count(b"\t") > first_line.count(b","):
        return "tsv"
    return "csv"


def output_name(input_name: str, target_format: str) -> str:
    """``sales.csv.gz`` converted to parquet is ``sales.parquet``."""
    lowered = input_name.lower()
    stem = input_name
    for extension in FORMAT_EXTENSIONS:
        if lowered.endswith(extension):
            stem = input_name[: -len(extension)]
            break
    extension = {"arrow": "arrow"}.get(target_format, target_format)
    return f"{stem or 'converted'}.{extension}"[-NAME_MAX_LENGTH:]


def parse_owner(owner: Any, field: str = "owner") -> int | None:
    if owner is None:
        return None
    if not isinstance(owner, int) or isinstance(owner, bool) or owner < 1:
        raise InvalidOptions("invalid arguments", {field: "must be a user id or null"})
    return owner


def parse_page(page: Any, per_page: Any, state: Any) -> tuple[int, int]:
    errors: dict[str, str] = {}
    if not isinstance(page, int) or isinstance(page, bool) or page < 1:
        errors["page"] = "must be 1 or more"
    if (
        not isinstance(per_page, int)
        or isinstance(per_page, bool)
        or not 1 <= per_page <= MAX_PER_PAGE
    ):
        errors["per_page"] = f"must be between 1 and {MAX_PER_PAGE}"
    if state is not None and state not in JOB_STATES:
        errors["state"] = f"must be one of {', '.join(JOB_STATES)}"
    if errors:
        raise InvalidOptions("invalid query", errors)
    return page, per_page


def encode_cursor(created_at: datetime, job_id: str) -> str:
    """A page's continuation: where its last job stands in the list's order."""
    stamp = _aware(created_at).astimezone(UTC).isoformat()  # type: ignore[union-attr]
    return base64.urlsafe_b64encode(f"{stamp}|{job_id}".encode()).decode().rstrip("=")


def parse_cursor(after: Any) -> tuple[datetime, str] | None:
    """``(created_at, id)`` of the job an ``after`` cursor names; None for none."""
    if after is None:
        return None
    refused = InvalidOptions(
        "invalid query", {"after": "must be a next_cursor from an earlier page"}
    )
    if not isinstance(after, str) or not 1 <= len(after) <= CURSOR_MAX_LENGTH:
        raise refused
    try:
        text = base64.urlsafe_b64decode(after + "=" * (-len(after) % 4)).decode()
        stamp, _, job_id = text.partition("|")
        created_at = datetime.fromisoformat(stamp)
        job_id = str(uuid.UUID(job_id))
    except (ValueError, UnicodeDecodeError):
        raise refused from None
    if created_at.tzinfo is None:
        raise refused
    return created_at.astimezone(UTC), job_id


def parse_seconds(value: Any, field: str) -> float:
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or value < 0
        or value != value
    ):
        raise InvalidOptions(
            "invalid arguments", {field: "must be a number of seconds"}
        )
    return float(value)


# -- payloads of rows ----------------------------------------------------------------


def _aware(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes for timezone-aware columns; we store UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _timestamp(value: datetime | None) -> str | None:
    value = _aware(value)
    return value.astimezone(UTC).isoformat() if value is not None else None


def dump_file(row: Any, with_key: bool = False) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "id": row.id,
        "name": row.name,
        "size": row.size,
        "format": row.format,
        "owner": row.owner,
        "created_at": _timestamp(row.created_at),
    }
    if with_key:
        payload["storage_key"] = row.storage_key
    return payload


def dump_job(row: Any) -> dict[str, Any]:
    output = None
    if row.state == STATE_SUCCEEDED:
        output = {
            "name": row.output_name,
            "format": row.target_format,
            "size": row.output_size or 0,
            "rows": row.output_rows,
            "storage_key": row.output_key,
        }
    payload = {
        "id": row.id,
        "state": row.state,
        "owner": row.owner,
        "input": {
            "file_id": row.file_id,
            "name": row.input_name,
            "format": row.input_format,
            "size": row.input_size,
        },
        "target_format": row.target_format,
        "options": row.options or {},
        "output": output,
        "progress": {
            "bytes": row.progress_bytes or 0,
            "rows": row.progress_rows,
            "percent": row.progress_percent,
        },
        "attempts": row.attempts or 0,
        "heartbeat_at": _timestamp(row.heartbeat_at),
        "created_at": _timestamp(row.created_at),
        "started_at": _timestamp(row.started_at),
        "finished_at": _timestamp(row.finished_at),
        "error": row.error,
    }
    # Validated against the published shape: a drift fails here, not in a caller.
    return JobPayload.model_validate(payload).model_dump(mode="json")
