"""The conversion engine, called in this process (the service runs it in a child).

Every format pair round-trips one small table full of the things that break
converters (nulls, unicode, delimiters and quotes and newlines inside fields,
dates, integers beyond 2**53), and the values are compared after the trip.
"""

from __future__ import annotations

import datetime
import gzip
import io
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from services.conversions.engine import ConversionFailed, convert
from services.conversions.schemas import FORMATS, parse_options, supported_pairs

REFERENCE = pl.DataFrame(
    {
        "id": [1, 2, 3, 4],
        "big": [2**62 + 7, -(2**60) - 3, None, 9_007_199_254_740_993],
        "name": ["Zoë", "日本語 😀", None, "plain"],
        "text": ["comma, inside", 'quote " inside', "new\nline", "tab\tand;semi"],
        "day": [
            datetime.date(1999, 12, 31),
            None,
            datetime.date(2024, 2, 29),
            datetime.date(1970, 1, 1),
        ],
        "amount": [1.5, -0.25, None, 1234567.125],
        "flag": [True, False, None, True],
    }
)
EXTENSIONS = {
    "csv": "csv",
    "tsv": "tsv",
    "ndjson": "ndjson",
    "json": "json",
    "parquet": "parquet",
    "arrow": "arrow",
    "xlsx": "xlsx",
}


def run(
    tmp_path: Path,
    source: Path,
    source_format: str,
    target_format: str,
    options: dict[str, Any] | None = None,
    **extra: Any,
) -> tuple[Path, dict[str, Any]]:
    parsed = parse_options(source_format, target_format, options or {})
    out = tmp_path / f"{source.stem}-{source_format}.{EXTENSIONS[target_format]}"
    scratch = tmp_path / f"scratch-{out.name}"
    scratch.mkdir()
    messages: list[Any] = []
    result = convert(
        messages.append,
        {
            "input_path": str(source),
            "source_format": source_format,
            "output_path": str(out),
            "target_format": target_format,
            "options": parsed.model_dump(exclude_unset=True),
            "scratch_dir": str(scratch),
            "input_size": source.stat().st_size,
            **extra,
        },
    )
    return out, result


def as_text(frame: pl.DataFrame) -> list[tuple[Any, ...]]:
    """Rows with every value as text: formats differ in types, not in values."""
    columns = []
    for name, dtype in frame.schema.items():
        column = pl.col(name)
        if dtype == pl.Datetime:
            column = column.dt.date()
        columns.append(column.cast(pl.Utf8))
    return frame.select(columns).rows()


def options_for(source_format: str) -> dict[str, Any]:
    # Dates in text come back typed only when asked for.
    return {"read": {"parse_dates": True}} if source_format in ("csv", "tsv") else {}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The reference table in every format, made by the engine from Parquet."""
    folder = tmp_path_factory.mktemp("sources")
    reference = folder / "reference.parquet"
    REFERENCE.write_parquet(reference)
    made = {"parquet": reference}
    for fmt in FORMATS:
        if fmt != "parquet":
            made[fmt], _ = run(folder, reference, "parquet", fmt)
    return made


@pytest.mark.parametrize(("source_format", "target_format"), supported_pairs())
def test_every_pair_keeps_every_value(
    tmp_path: Path, sources: dict[str, Path], source_format: str, target_format: str
) -> None:
    converted, result = run(
        tmp_path,
        sources[source_format],
        source_format,
        target_format,
        options_for(source_format),
    )
    back, _ = run(
        tmp_path, converted, target_format, "parquet", options_for(target_format)
    )

    assert result["rows"] == REFERENCE.height
    got = pl.read_parquet(back)
    assert got.columns == REFERENCE.columns
    assert as_text(got) == as_text(REFERENCE)
    if not {source_format, target_format} & {"json", "ndjson"}:  # no JSON dates
        assert got.schema["day"] in (pl.Date, pl.Datetime)


# -- bad input: each fails with a message that says what is wrong ---------------------

LATIN1 = "name,city\nJosé,Montréal\n".encode("latin-1")


def parquet_bytes() -> bytes:
    buffer = io.BytesIO()
    REFERENCE.write_parquet(buffer)
    return buffer.getvalue()


BAD_INPUTS = [
    ("ragged.csv", "csv", b"a,b\n1,2\n3,4,5\n6,7\n", "line 3 has 3 fields"),
    ("empty.csv", "csv", b"", "the file is empty"),
    ("latin1.csv", "csv", LATIN1, "not valid UTF-8"),
    ("truncated.parquet", "parquet", parquet_bytes()[:-100], "truncated or damaged"),
    ("broken.xlsx", "xlsx", b"PK\x03\x04" + b"\x00garbage" * 50, "XLSX"),
    ("one-line.csv", "csv", b"a," * 600_000, "line 1 is longer than"),
    ("picture.csv", "csv", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary file"),
    ("table.csv", "csv", parquet_bytes(), "Parquet file, not CSV"),
    ("text.parquet", "parquet", b"a,b\n1,2\n", "not a Parquet file"),
    ("cut.json", "json", b'[{"a": 1}, {"a": 2', "truncated"),
    ("scalars.json", "json", b"[1, 2]", "not an object"),
    ("cut.csv.gz", "csv", gzip.compress(b"a,b\n" * 1000)[:-40], "gzip"),
]


@pytest.mark.parametrize(
    ("name", "fmt", "data", "message"),
    BAD_INPUTS,
    ids=[name for name, *_ in BAD_INPUTS],
)
def test_bad_input_fails_with_a_clear_message(
    tmp_path: Path, name: str, fmt: str, data: bytes, message: str
) -> None:
    source = tmp_path / name
    source.write_bytes(data)

    with pytest.raises(ConversionFailed, match=message) as caught:
        run(tmp_path, source, fmt, "parquet", max_record_bytes=1 << 20)

    assert str(tmp_path) not in str(caught.value)


def test_latin1_converts_when_asked_for(tmp_path: Path) -> None:
    source = tmp_path / "latin1.csv"
    source.write_bytes(LATIN1)

    out, _ = run(tmp_path, source, "csv", "parquet", {"read": {"encoding": "latin-1"}})

    assert pl.read_parquet(out).rows() == [("José", "Montréal")]


def test_compressed_input_is_read_and_options_apply(tmp_path: Path) -> None:
    source = tmp_path / "semi.csv.gz"
    source.write_bytes(gzip.compress(b"id;name;x\n1;ann;NA\n2;bob;3\n"))

    out, result = run(
        tmp_path,
        source,
        "csv",
        "csv",
        {
            "read": {"delimiter": ";", "null_values": ["NA"]},
            "write": {"delimiter": "|", "null_value": "-"},
            "columns": ["name", "x"],
            "rename": {"name": "who"},
        },
    )

    assert result["rows"] == 2
    assert out.read_text() == "who|x\nann|-\nbob|3\n"


def test_unknown_columns_are_named_in_the_message(tmp_path: Path) -> None:
    source = tmp_path / "a.csv"
    source.write_bytes(b"a,b\n1,2\n")

    with pytest.raises(
        ConversionFailed, match="no column 'z' in the input; it has: a, b"
    ):
        run(tmp_path, source, "csv", "parquet", {"columns": ["z"]})
