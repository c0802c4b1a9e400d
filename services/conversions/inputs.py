"""Checking and decoding an input file before polars reads it.

A file that is not what its format says (a Parquet file named ``.csv``, a
truncated workbook) or a text file with one gigantic line is refused here with a
message for the user, instead of failing deep in polars or reading a line of
gigabytes into memory in one piece. Compressed and Latin-1 text is decoded to a
UTF-8 scratch copy, a chunk at a time, so that polars can stream it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pyarrow as pa

from services.conversions.streams import MAX_RECORD_BYTES, ConversionFailed

log = logging.getLogger(__name__)

CHUNK = 1 << 20

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ZIP_MAGIC = b"PK\x03\x04"
_PARQUET_MAGIC = b"PAR1"
_ARROW_MAGIC = b"ARROW1"


def _compression(path: str, wanted: str) -> str:
    if wanted != "auto":
        return wanted
    with open(path, "rb") as stream:
        head = stream.read(4)
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if head.startswith(_ZSTD_MAGIC):
        return "zstd"
    return "none"


def plain_utf8(path: str, read: dict[str, Any], scratch: Path, fmt: str) -> str:
    """``path`` itself if it is uncompressed UTF-8, else a decoded scratch copy."""
    compression = _compression(path, read.get("compression", "auto"))
    encoding = read.get("encoding", "utf-8")
    if compression == "none" and encoding == "utf-8":
        _check_not_binary(path, fmt)
        return path
    target = scratch / f"input.{fmt}"
    source: Any
    if compression == "none":
        source = open(path, "rb")  # noqa: SIM115 - closed below
    else:
        try:
            source = pa.CompressedInputStream(pa.OSFile(path), compression)
        except (pa.ArrowException, OSError) as exc:
            raise ConversionFailed(
                f"cannot open the {compression} file: {exc}"
            ) from None
    try:
        with open(target, "wb") as out:
            while True:
                try:
                    chunk = source.read(CHUNK)
                except (pa.ArrowException, OSError) as exc:
                    raise ConversionFailed(
                        f"the {compression} compressed data is damaged or truncated"
                    ) from exc
                if not chunk:
                    break
                if encoding == "latin-1":
                    # Latin-1 maps every byte to one character: chunk boundaries
                    # can never split one.
                    chunk = chunk.decode("latin-1").encode("utf-8")
                out.write(chunk)
    finally:
        source.close()
    if os.path.getsize(target) == 0:
        raise ConversionFailed("the file is empty once decompressed")
    if encoding == "utf-8":
        _check_not_binary(str(target), fmt)
    return str(target)


def _check_not_binary(path: str, fmt: str) -> None:
    """A quick look at the first bytes, for files that are not what their name says."""
    with open(path, "rb") as stream:
        head = stream.read(64 << 10)
    for magic, what in (
        (_PARQUET_MAGIC, "a Parquet file"),
        (_ARROW_MAGIC, "an Arrow IPC file"),
        (_ZIP_MAGIC, "a ZIP archive (an XLSX workbook?)"),
    ):
        if head.startswith(magic):
            raise ConversionFailed(f"this is {what}, not {fmt.upper()} text")
    if b"\x00" in head:
        raise ConversionFailed(f"this is a binary file, not {fmt.upper()} text")


def check_magic(path: str, fmt: str) -> None:
    with open(path, "rb") as stream:
        head = stream.read(8)
        stream.seek(max(os.path.getsize(path) - 4, 0))
        tail = stream.read(4)
    if fmt == "parquet" and not head.startswith(_PARQUET_MAGIC):
        raise ConversionFailed("this is not a Parquet file")
    if fmt == "parquet" and (tail != _PARQUET_MAGIC or len(head) < 8):
        raise ConversionFailed("the Parquet file is truncated or damaged")
    if fmt == "arrow" and not head.startswith(_ARROW_MAGIC):
        raise ConversionFailed("this is not an Arrow IPC (Feather v2) file")
    if fmt == "xlsx" and not head.startswith(_ZIP_MAGIC):
        raise ConversionFailed("this is not an XLSX workbook")
    if fmt == "json" and not head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        raise ConversionFailed(
            "this is not a JSON array of objects (it must start with '[')"
        )


def check_records(path: str, fmt: str, limit: int = MAX_RECORD_BYTES) -> None:
    """Refuse a line longer than ``limit`` bytes before polars reads it.

    A scan for line ends at memory speed (a tenth of a second or two a gigabyte
    from the page cache), and the only way to keep one gigantic line from being
    read in one piece. Quoted newlines make a line shorter than its record, never
    longer, so this never refuses a file polars could read in bounded memory.
    """
    size = os.path.getsize(path)
    if size <= limit:
        return
    step = min(CHUNK * 8, max(limit // 2, 1))
    # Chunks are at most half the limit, so a line over it spans a whole chunk:
    # only where each chunk's first and last line ends are matters.
    buffer = bytearray(step)
    line_start = 0  # file offset where the current line began
    offset = 0  # file offset of the current chunk
    too_long = False
    with open(path, "rb", buffering=0) as stream:
        while (count := stream.readinto(buffer)) > 0:
            first = buffer.find(b"\n", 0, count)
            if first != -1 and offset + first - line_start > limit:
                too_long = True
                break
            if first != -1:
                line_start = offset + buffer.rfind(b"\n", 0, count) + 1
            offset += count
            if offset - line_start > limit:
                too_long = True
                break
    if too_long:
        raise ConversionFailed(
            f"line {_line_number(path, line_start)} is longer than {_size(limit)}; "
            f"this does not look like {fmt.upper()} with one record a line"
        )


def _line_number(path: str, before: int) -> int:
    """The number of the line starting at byte ``before`` (counted on failure only)."""
    lines = 1
    with open(path, "rb") as stream:
        while before > 0 and (chunk := stream.read(min(CHUNK * 8, before))):
            lines += chunk.count(b"\n")
            before -= len(chunk)
    return lines


def _size(limit: int) -> str:
    if limit >= 1 << 20:
        return f"{limit / (1 << 20):g} MB"
    return f"{limit:,} bytes"
