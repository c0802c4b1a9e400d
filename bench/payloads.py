"""The request payloads every RPC benchmark sends (and gets echoed back)."""

from __future__ import annotations

import json
from typing import Any

TINY = "tiny"
LARGE = "10KB"
PAYLOAD_NAMES = (TINY, LARGE)

LARGE_SIZE = 10 * 1024  # bytes of JSON


def make_payload(name: str) -> Any:
    """The payload called ``name``.

    The 10 KB one is a list of small records rather than one long string, so that
    serializing it costs what a typical API response costs, not a memcpy.
    """
    if name == TINY:
        return "ping"
    if name == LARGE:
        records: list[dict[str, Any]] = []
        while len(json.dumps(records)) < LARGE_SIZE:
            i = len(records)
            records.append(
                {
                    "id": i,
                    "name": f"item-{i:05d}",
                    "price": i * 1.25,
                    "tags": ["a", "b"],
                    "active": i % 2 == 0,
                }
            )
        return records
    raise ValueError(f"unknown payload {name!r}; expected one of {PAYLOAD_NAMES}")


def encoded_size(name: str) -> int:
    return len(json.dumps(make_payload(name)).encode())
