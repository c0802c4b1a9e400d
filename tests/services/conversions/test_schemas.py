"""The conversions contract: formats, pairs and option validation."""

from __future__ import annotations

from typing import Any

import pytest

from services.conversions.exceptions import InvalidOptions, UnsupportedConversion
from services.conversions.schemas import (
    FORMATS,
    ConversionOptions,
    formats_payload,
    parse_options,
    supported_pairs,
)


def test_formats_lists_every_format_with_its_options_and_pairs() -> None:
    payload = formats_payload()

    names = [fmt["name"] for fmt in payload["formats"]]
    assert names == list(FORMATS)
    parquet = next(fmt for fmt in payload["formats"] if fmt["name"] == "parquet")
    assert parquet["write_options"]["compression"] == ["zstd", "snappy", "none"]
    assert ["csv", "parquet"] in payload["pairs"]
    assert ["json", "json"] not in payload["pairs"]


def test_every_format_converts_to_every_other() -> None:
    pairs = set(supported_pairs())
    assert all((a, b) in pairs for a in FORMATS for b in FORMATS if a != b)


def test_valid_options_are_parsed_with_defaults() -> None:
    options = parse_options(
        "csv",
        "parquet",
        {"read": {"delimiter": ";", "encoding": "latin-1"}, "columns": ["a"]},
    )

    assert isinstance(options, ConversionOptions)
    assert options.read.delimiter == ";" and options.read.header is True
    assert options.write.compression is None
    assert options.columns == ["a"]


@pytest.mark.parametrize(
    ("source", "target", "options", "field"),
    [
        ("csv", "parquet", {"read": {"sheet": "x"}}, "read.sheet"),
        ("csv", "parquet", {"write": {"compression": "lz4"}}, "write.compression"),
        ("parquet", "csv", {"read": {"delimiter": ";"}}, "read.delimiter"),
        ("csv", "json", {"write": {"header": False}}, "write.header"),
        ("csv", "csv", {"read": {"delimiter": ";;"}}, "read.delimiter"),
        ("csv", "csv", {"read": {"encoding": "utf-16"}}, "read.encoding"),
        ("csv", "csv", {"surprise": 1}, "surprise"),
        ("csv", "csv", {"columns": ["a", "a"]}, "columns"),
        ("csv", "csv", {"rename": {"a": "x", "b": "x"}}, "rename"),
        ("csv", "csv", "not an object", "options"),
    ],
)
def test_options_that_do_not_apply_are_refused_by_field(
    source: str, target: str, options: Any, field: str
) -> None:
    with pytest.raises(InvalidOptions) as caught:
        parse_options(source, target, options)

    assert field in caught.value.errors
    assert field in str(caught.value)


@pytest.mark.parametrize(("source", "target"), [("csv", "pdf"), ("doc", "csv")])
def test_unknown_formats_are_unsupported(source: str, target: str) -> None:
    with pytest.raises(UnsupportedConversion, match="format"):
        parse_options(source, target, {})
