"""The formats polars cannot stream, converted incrementally: JSON arrays and XLSX.

A JSON array becomes NDJSON (and back) one object at a time; an XLSX sheet is read
row by row into a Parquet file (two passes: the first settles each column's type)
and written from polars' batches with xlsxwriter's constant-memory mode. Memory
stays bounded by a batch, whatever the file size. Runs in the conversion's child
process, like ``engine``.
"""

from __future__ import annotations

import datetime
import json
import zipfile
from pathlib import Path
from typing import Any, Protocol

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "MAX_RECORD_BYTES",
    "ConversionFailed",
    "RowCounter",
    "json_array_to_ndjson",
    "ndjson_to_json_array",
    "write_xlsx",
    "xlsx_to_parquet",
]

# A record longer than this is refused rather than read: a whole file on one line
# would otherwise be held in memory at once.
MAX_RECORD_BYTES = 64 << 20
XLSX_MAX_ROWS = 1_048_576
XLSX_BATCH_ROWS = 10_000
# Excel stores numbers as doubles: integers beyond 2**53 would lose digits.
XLSX_MAX_EXACT_INTEGER = 2**53
_CHUNK = 1 << 20


class ConversionFailed(Exception):
    """The input cannot be converted as asked; the message says why, for a user."""


class RowCounter(Protocol):
    """Where a loop that sees every row records how many it has done."""

    rows: int | None


# -- JSON arrays ---------------------------------------------------------------------------


def json_array_to_ndjson(path: str, target: Path) -> int:
    """Stream a JSON array of objects into NDJSON, one object at a time."""
    decoder = json.JSONDecoder()
    rows = 0
    with (
        open(path, encoding="utf-8-sig", errors="strict") as source,
        open(target, "w", encoding="utf-8") as out,
    ):
        buffer = ""
        offset = 0  # characters consumed before ``buffer``
        started = ended = False
        eof = False

        def fill() -> bool:
            nonlocal buffer, eof
            if eof:
                return False
            chunk = source.read(_CHUNK)
            if not chunk:
                eof = True
                return False
            buffer += chunk
            return True

        try:
            while True:
                stripped = buffer.lstrip()
                offset += len(buffer) - len(stripped)
                buffer = stripped
                if not buffer:
                    if not fill():
                        break
                    continue
                if not started:
                    if buffer[0] != "[":
                        raise ConversionFailed(
                            "this is not a JSON array of objects (it must start with '[')"
                        )
                    started = True
                    buffer, offset = buffer[1:], offset + 1
                    continue
                if ended:
                    raise ConversionFailed(
                        f"unexpected data after the JSON array, at character {offset}"
                    )
                if buffer[0] == "]":
                    ended = True
                    buffer, offset = buffer[1:], offset + 1
                    continue
                if buffer[0] == "," and rows:
                    buffer, offset = buffer[1:], offset + 1
                    continue
                try:
                    value, end = decoder.raw_decode(buffer)
                except json.JSONDecodeError as exc:
                    if len(buffer) > MAX_RECORD_BYTES:
                        raise ConversionFailed(
                            f"invalid JSON at character {offset + exc.pos}: {exc.msg}"
                        ) from None
                    if fill():
                        continue
                    if exc.pos >= len(buffer.rstrip()):
                        raise ConversionFailed(
                            "the JSON is truncated: the file ends inside an object"
                        ) from None
                    raise ConversionFailed(
                        f"invalid JSON at character {offset + exc.pos}: {exc.msg}"
                    ) from None
                if end == len(buffer) and not eof and fill():
                    # A number at the end of the buffer may go on in the next chunk.
                    continue
                if not isinstance(value, dict):
                    raise ConversionFailed(
                        f"item {rows + 1} of the JSON array is not an object"
                    )
                out.write(json.dumps(value, ensure_ascii=False))
                out.write("\n")
                rows += 1
                buffer, offset = buffer[end:], offset + end
        except UnicodeDecodeError:
            raise ConversionFailed("the file is not valid UTF-8 text") from None
    if not started:
        raise ConversionFailed("the file holds no JSON")
    if not ended:
        raise ConversionFailed("the JSON array is not closed: the file is truncated")
    return rows


def ndjson_to_json_array(source: Path, target: str) -> int:
    rows = 0
    with open(source, "rb") as lines, open(target, "wb") as out:
        out.write(b"[")
        for line in lines:
            line = line.rstrip(b"\r\n")
            if not line:
                continue
            out.write(b",\n" if rows else b"\n")
            out.write(line)
            rows += 1
        out.write(b"\n]\n")
    return rows


# -- XLSX ---------------------------------------------------------------------------------


def xlsx_to_parquet(
    path: str, sheet: str | None, target: Path, progress: RowCounter
) -> None:
    """A sheet, read row by row (openpyxl's read-only mode), into a Parquet file.

    Two passes: the first settles each column's type from every value, so the
    second can write batches of one schema (a column of numbers with one word in
    it becomes text, not an error halfway through).
    """
    import openpyxl
    from openpyxl.utils.exceptions import InvalidFileException

    try:
        workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except (zipfile.BadZipFile, InvalidFileException, KeyError, OSError) as exc:
        raise ConversionFailed(
            f"the XLSX workbook cannot be opened: it is damaged or not XLSX ({exc})"
        ) from None
    try:
        if sheet is not None and sheet not in workbook.sheetnames:
            raise ConversionFailed(
                f"the workbook has no sheet {sheet!r}; "
                f"it has: {', '.join(workbook.sheetnames)}"
            )
        worksheet = workbook[sheet] if sheet is not None else workbook.worksheets[0]
        rows = worksheet.iter_rows(values_only=True)
        header = next(rows, None)
        if header is None:
            raise ConversionFailed("the sheet is empty")
        names = _column_names(header)
        kinds: list[set[type]] = [set() for _ in names]
        for row in rows:
            for i, value in enumerate(row[: len(names)]):
                if value is not None:
                    kinds[i].add(type(value))
                    if (
                        isinstance(value, datetime.datetime)
                        and value.time() != _MIDNIGHT
                    ):
                        kinds[i].add(_WithTime)
        types = [_arrow_type(found) for found in kinds]
        schema = pa.schema(list(zip(names, types, strict=True)))
        writer = pq.ParquetWriter(str(target), schema, compression="none")
        try:
            batch: list[tuple[Any, ...]] = []
            progress.rows = 0
            for row in worksheet.iter_rows(min_row=2, values_only=True):
                batch.append(row)
                if len(batch) >= XLSX_BATCH_ROWS:
                    writer.write_table(_xlsx_batch(batch, names, types, schema))
                    progress.rows += len(batch)
                    batch = []
            if batch:
                writer.write_table(_xlsx_batch(batch, names, types, schema))
                progress.rows += len(batch)
        finally:
            writer.close()
    except (zipfile.BadZipFile, KeyError, ValueError, TypeError) as exc:
        raise ConversionFailed(f"the XLSX workbook is damaged: {exc}") from None
    finally:
        workbook.close()


_MIDNIGHT = datetime.time(0, 0)


class _WithTime:
    """Marks a column holding a datetime whose time is not midnight."""


def _column_names(header: tuple[Any, ...]) -> list[str]:
    names: list[str] = []
    for i, value in enumerate(header):
        name = str(value) if value is not None else f"column_{i + 1}"
        while name in names:
            name += "_"
        names.append(name)
    return names


def _arrow_type(found: set[type]) -> pa.DataType:
    if not found:
        return pa.string()
    if found <= {bool}:
        return pa.bool_()
    if found <= {int}:
        return pa.int64()
    if found <= {int, float}:
        return pa.float64()
    if found <= {datetime.datetime, datetime.date}:
        # Excel has no dates without a time: all at midnight means dates.
        return pa.date32()
    if found <= {datetime.datetime, datetime.date, _WithTime}:
        return pa.timestamp("us")
    return pa.string()


def _xlsx_batch(
    rows: list[tuple[Any, ...]],
    names: list[str],
    types: list[pa.DataType],
    schema: pa.Schema,
) -> pa.Table:
    columns = []
    for i, kind in enumerate(types):
        values = [row[i] if i < len(row) else None for row in rows]
        if kind == pa.string():
            values = [_cell_text(value) for value in values]
        elif kind == pa.float64():
            values = [None if value is None else float(value) for value in values]
        elif kind == pa.date32():
            values = [_as_date(value) for value in values]
        columns.append(pa.array(values, type=kind))
    return pa.Table.from_arrays(columns, schema=schema)


def _as_date(value: Any) -> datetime.date | None:
    if isinstance(value, datetime.datetime):
        return value.date()
    return value


def _cell_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    return str(value)


def write_xlsx(frame: pl.LazyFrame, out: str, progress: RowCounter) -> int:
    import xlsxwriter

    # constant_memory: each row is flushed to disk as it is written.
    workbook = xlsxwriter.Workbook(
        out, {"constant_memory": True, "strings_to_numbers": False}
    )
    try:
        sheet = workbook.add_worksheet("data")
        date_format = workbook.add_format({"num_format": "yyyy-mm-dd"})
        datetime_format = workbook.add_format({"num_format": "yyyy-mm-dd hh:mm:ss"})
        names = frame.collect_schema().names()
        sheet.write_row(0, 0, names)
        row_number = 0
        progress.rows = 0
        for batch in frame.collect_batches(chunk_size=XLSX_BATCH_ROWS):
            if row_number + batch.height >= XLSX_MAX_ROWS:
                raise ConversionFailed(
                    f"the data has more than {XLSX_MAX_ROWS - 1:,} rows, "
                    "more than an XLSX sheet can hold; choose another format"
                )
            for row in batch.iter_rows():
                row_number += 1
                for column, value in enumerate(row):
                    _write_cell(
                        sheet, row_number, column, value, date_format, datetime_format
                    )
            progress.rows = row_number
        return row_number
    finally:
        workbook.close()


def _write_cell(
    sheet: Any, row: int, column: int, value: Any, date_format: Any, dt_format: Any
) -> None:
    if value is None:
        return
    if isinstance(value, bool):
        sheet.write_boolean(row, column, value)
    elif isinstance(value, int) and abs(value) > XLSX_MAX_EXACT_INTEGER:
        # As text, to keep every digit: Excel would round it to a double.
        sheet.write_string(row, column, str(value))
    elif isinstance(value, int | float):
        sheet.write_number(row, column, value)
    elif isinstance(value, datetime.datetime):
        sheet.write_datetime(row, column, value.replace(tzinfo=None), dt_format)
    elif isinstance(value, datetime.date):
        sheet.write_datetime(row, column, value, date_format)
    elif isinstance(value, str):
        sheet.write_string(row, column, value)
    else:
        sheet.write_string(row, column, json.dumps(value, default=str))
