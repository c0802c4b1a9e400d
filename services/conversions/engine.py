"""The conversion engine: one file in, one file out, streaming, in a child process.

``convert`` runs in a child process started through ``framework.concurrency``
(never in the service's own process: it is CPU-bound and would stall every green
thread), so this module imports neither eventlet nor the framework's containers.

Every input becomes a polars ``LazyFrame`` and every output is written by a polars
streaming sink, so memory stays bounded whatever the file size. The formats polars
cannot stream natively go through a scratch file first, written incrementally:
compressed or Latin-1 text is decoded to UTF-8 (and every input checked) in
``inputs``; JSON arrays and XLSX sheets are handled in ``streams``.

Errors a user can fix are raised as ``ConversionFailed`` with a message meant for
them (no paths, no tracebacks); anything else is a bug and is reported as such.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import resource
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from services.conversions.inputs import (
    CHUNK,
    check_magic,
    check_records,
    plain_utf8,
)
from services.conversions.streams import (
    MAX_RECORD_BYTES,
    ConversionFailed,
    json_array_to_ndjson,
    ndjson_to_json_array,
    write_xlsx,
    xlsx_to_parquet,
)

log = logging.getLogger(__name__)

__all__ = ["MAX_RECORD_BYTES", "ConversionFailed", "convert", "warm_up"]

Send = Callable[[Any], None]

PROGRESS_INTERVAL = 0.5  # seconds between progress messages from the child
# polars infers column types from this many rows; more rows, fewer surprises later.
INFER_SCHEMA_ROWS = 10_000


def convert(send: Send, job: dict[str, Any]) -> dict[str, Any]:
    """Convert ``job["input_path"]`` to ``job["output_path"]``; the rows written.

    ``job``: input_path, source_format, output_path, target_format, options (as
    validated by ``schemas.parse_options``), scratch_dir (a folder the caller
    removes afterwards). ``send`` reports progress as ``{"bytes", "rows"}``.
    """
    progress = _Progress(send, int(job.get("input_size") or 0))
    progress.start()
    try:
        frame = _read(job, progress)
        frame = _select(frame, job["options"])
        try:
            frame.collect_schema()
        except Exception as exc:  # noqa: BLE001 - explained to the user below
            raise ConversionFailed(_explain(exc, job)) from None
        rows = _write(frame, job, progress)
    except ConversionFailed:
        raise
    except Exception as exc:  # noqa: BLE001 - library errors about the data
        message = _explain(exc, job)
        raise ConversionFailed(message) from None
    finally:
        progress.stop()
    return {
        "rows": rows,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def warm_up(send: Send) -> None:
    """Nothing: run once at start so the first real job finds the forkserver up."""


# -- progress -------------------------------------------------------------------------


class _Progress:
    """Sends how far the child has got, twice a second, from its own thread.

    polars reads and writes in native threads we cannot hook, so "bytes" is what
    this process has read from files (Linux's ``/proc/self/io``), which follows
    the input closely for large files; "rows" is counted where the rows pass
    through Python (XLSX, JSON), else known at the end only.
    """

    def __init__(self, send: Send, total: int) -> None:
        self.send = send
        self.total = total
        self.rows: int | None = None
        self._done = threading.Event()
        self._base = _bytes_read()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=1)

    def _run(self) -> None:
        while not self._done.wait(PROGRESS_INTERVAL):
            read = max(_bytes_read() - self._base, 0)
            if self.total:
                read = min(read, self.total)
            self.send({"bytes": read, "rows": self.rows})


def _bytes_read() -> int:
    try:
        with open("/proc/self/io", encoding="ascii") as stats:
            for line in stats:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# -- reading ------------------------------------------------------------------------------


def _read(job: dict[str, Any], progress: _Progress) -> pl.LazyFrame:
    fmt = job["source_format"]
    path = job["input_path"]
    read = job["options"].get("read", {})
    scratch = Path(job["scratch_dir"])
    if os.path.getsize(path) == 0:
        raise ConversionFailed("the file is empty")
    if fmt in ("csv", "tsv"):
        text = plain_utf8(path, read, scratch, fmt)
        job["_text_path"] = text
        check_records(text, fmt, _record_limit(job))
        separator = "\t" if fmt == "tsv" else (read.get("delimiter") or ",")
        return pl.scan_csv(
            text,
            separator=separator,
            has_header=read.get("header", True),
            quote_char=read.get("quote_char") or '"',
            null_values=read.get("null_values") or None,
            infer_schema_length=INFER_SCHEMA_ROWS,
            try_parse_dates=read.get("parse_dates", False),
            raise_if_empty=True,
        )
    if fmt == "ndjson":
        text = plain_utf8(path, {**read, "encoding": "utf-8"}, scratch, fmt)
        check_records(text, fmt, _record_limit(job))
        return pl.scan_ndjson(text, infer_schema_length=INFER_SCHEMA_ROWS)
    if fmt == "json":
        check_magic(path, fmt)
        lines = scratch / "input.ndjson"
        progress.rows = json_array_to_ndjson(path, lines)
        if progress.rows == 0:
            raise ConversionFailed(
                "the JSON array is empty: there is nothing to convert"
            )
        return pl.scan_ndjson(lines, infer_schema_length=INFER_SCHEMA_ROWS)
    if fmt == "parquet":
        check_magic(path, fmt)
        return pl.scan_parquet(path)
    if fmt == "arrow":
        check_magic(path, fmt)
        return pl.scan_ipc(path)
    if fmt == "xlsx":
        check_magic(path, fmt)
        table = scratch / "sheet.parquet"
        xlsx_to_parquet(path, read.get("sheet"), table, progress)
        return pl.scan_parquet(table)
    raise ConversionFailed(f"cannot read {fmt} files")


def _record_limit(job: dict[str, Any]) -> int:
    return int(job.get("max_record_bytes") or MAX_RECORD_BYTES)


# -- column selection ---------------------------------------------------------------------


def _select(frame: pl.LazyFrame, options: dict[str, Any]) -> pl.LazyFrame:
    columns = options.get("columns")
    rename = options.get("rename") or {}
    if not columns and not rename:
        return frame
    try:
        available = frame.collect_schema().names()
    except Exception:  # noqa: BLE001 - the same error comes back, explained, later
        return frame
    if columns:
        missing = [name for name in columns if name not in available]
        if missing:
            raise ConversionFailed(
                f"no column {', '.join(map(repr, missing))} in the input; "
                f"it has: {', '.join(available)}"
            )
        frame = frame.select(columns)
        available = list(columns)
    unknown = [name for name in rename if name not in available]
    if unknown:
        raise ConversionFailed(
            f"cannot rename {', '.join(map(repr, unknown))}: no such column; "
            f"the columns are: {', '.join(available)}"
        )
    final = [rename.get(name, name) for name in available]
    if len(set(final)) != len(final):
        raise ConversionFailed("renaming would give two columns the same name")
    return frame.rename(rename)


# -- writing ------------------------------------------------------------------------------


def _write(frame: pl.LazyFrame, job: dict[str, Any], progress: _Progress) -> int | None:
    fmt = job["target_format"]
    out = job["output_path"]
    write = job["options"].get("write", {})
    if fmt in ("csv", "tsv"):
        separator = "\t" if fmt == "tsv" else (write.get("delimiter") or ",")
        frame.sink_csv(
            out,
            separator=separator,
            include_header=write.get("header", True),
            null_value=write.get("null_value", ""),
            check_extension=False,
        )
        return _count_csv_rows(out, separator, write.get("header", True))
    if fmt == "ndjson":
        frame.sink_ndjson(out, check_extension=False)
        return _count_lines(out)
    if fmt == "json":
        lines = Path(job["scratch_dir"]) / "output.ndjson"
        frame.sink_ndjson(lines, check_extension=False)
        return ndjson_to_json_array(lines, out)
    if fmt == "parquet":
        compression = write.get("compression") or "zstd"
        frame.sink_parquet(
            out, compression="uncompressed" if compression == "none" else compression
        )
        return int(pq.ParquetFile(out).metadata.num_rows)
    if fmt == "arrow":
        compression = write.get("compression") or "none"
        frame.sink_ipc(
            out, compression="uncompressed" if compression == "none" else compression
        )
        return int(pl.scan_ipc(out).select(pl.len()).collect().item())
    if fmt == "xlsx":
        return write_xlsx(frame, out, progress)
    raise ConversionFailed(f"cannot write {fmt} files")


def _count_csv_rows(path: str, separator: str, header: bool) -> int:
    if not os.path.getsize(path):
        return 0
    rows = pl.scan_csv(path, separator=separator, has_header=header, infer_schema=False)
    return int(rows.select(pl.len()).collect().item())


def _count_lines(path: str) -> int:
    count = 0
    with open(path, "rb") as stream:
        while chunk := stream.read(CHUNK * 8):
            count += chunk.count(b"\n")
    return count


# -- explaining failures ------------------------------------------------------------------

_LINE_NUMBER = re.compile(r"line (\d+)")


def _explain(exc: BaseException, job: dict[str, Any]) -> str:
    """A message for the user: what is wrong with their file, in their terms."""
    fmt = job["source_format"]
    text = str(exc)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    lowered = text.lower()
    if "utf-8" in lowered or "utf8" in lowered:
        return (
            "the file is not valid UTF-8 text; if it is Latin-1, "
            "set the read option encoding to latin-1"
        )
    if fmt in ("csv", "tsv"):
        located = _locate_csv_error(job)
        if located:
            return located
    if isinstance(exc, pl.exceptions.NoDataError):
        return "the file has no data"
    if fmt == "parquet" and ("parquet" in lowered or "footer" in lowered):
        return "the Parquet file is truncated or damaged"
    if fmt == "arrow":
        return "the Arrow IPC file is truncated or damaged"
    if fmt == "ndjson" and ("json" in lowered or "eof" in lowered):
        return f"invalid NDJSON: {_scrub(first, job)}"
    if isinstance(exc, pl.exceptions.PolarsError | pa.ArrowException):
        return f"the {fmt} data cannot be converted: {_scrub(first, job)}"
    log.exception("unexpected error in a conversion")
    return "the conversion failed because of an internal error"


def _scrub(message: str, job: dict[str, Any]) -> str:
    """No paths of ours in a message a user sees."""
    for key in ("input_path", "output_path", "scratch_dir"):
        value = job.get(key)
        if value:
            message = message.replace(str(value), "<file>")
    return message[:300]


def _locate_csv_error(job: dict[str, Any]) -> str | None:
    """The first record with the wrong number of fields, found with Python's csv.

    Only run after polars failed, so it costs nothing on good files. Reads the
    decoded text polars read; stops at the first problem.
    """
    read = job["options"].get("read", {})
    path = job.get("_text_path")
    if path is None:
        return None
    separator = (
        "\t" if job["source_format"] == "tsv" else (read.get("delimiter") or ",")
    )
    try:
        with open(path, encoding="utf-8", newline="") as stream:
            reader = csv.reader(
                _bounded_lines(stream),
                delimiter=separator,
                quotechar=read.get("quote_char") or '"',
                strict=True,
            )
            expected: int | None = None
            for record in reader:
                if expected is None:
                    expected = len(record)
                    continue
                if record and len(record) != expected:
                    return (
                        f"malformed {job['source_format'].upper()}: line "
                        f"{reader.line_num} has {len(record)} fields, "
                        f"the first line has {expected}"
                    )
    except csv.Error as exc:
        return f"malformed {job['source_format'].upper()} near line {_line(exc)}: {exc}"
    except (UnicodeDecodeError, OSError):
        return None
    return None


def _line(exc: csv.Error) -> str:
    match = _LINE_NUMBER.search(str(exc))
    return match.group(1) if match else "?"


def _bounded_lines(stream: io.TextIOBase) -> Iterator[str]:
    while True:
        line = stream.readline(MAX_RECORD_BYTES)
        if not line:
            return
        yield line
