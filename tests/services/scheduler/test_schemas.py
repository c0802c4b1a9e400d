"""The scheduler's published shapes: what is accepted, and how refusals read."""

from __future__ import annotations

from typing import Any

import pytest

from services.scheduler.exceptions import InvalidSchedule
from services.scheduler.schemas import (
    ScheduleDetail,
    parse_changes,
    parse_page,
    parse_preview,
    parse_schedule,
    parse_schedule_id,
)

VALID: dict[str, Any] = {
    "name": "purge",
    "cron": "0 3 * * *",
    "timezone": "Europe/Paris",
    "target": {
        "kind": "rpc",
        "service": "conversions",
        "method": "purge_expired",
        "kwargs": {"older_than_seconds": 604800},
    },
}


def refusal(data: Any) -> dict[str, str]:
    with pytest.raises(InvalidSchedule) as caught:
        parse_schedule(data)
    return caught.value.errors


def test_a_valid_schedule_gets_the_documented_defaults() -> None:
    spec = parse_schedule(VALID)
    assert (spec.missed_run_policy, spec.overlap_policy) == ("skip", "skip")
    assert (spec.jitter_seconds, spec.timeout_seconds, spec.history_limit) == (
        0,
        60,
        100,
    )
    assert spec.enabled is True


def test_every_bad_field_is_reported_at_once() -> None:
    errors = refusal(
        {
            **VALID,
            "cron": "0 25 * * *",
            "timezone": "Europe/Atlantis",
            "overlap_policy": "sometimes",
            "jitter_seconds": -1,
            "colour": "red",
        }
    )
    assert set(errors) == {
        "cron",
        "timezone",
        "overlap_policy",
        "jitter_seconds",
        "colour",
    }
    assert "not a valid cron expression" in errors["cron"]
    assert "unknown time zone" in errors["timezone"]


@pytest.mark.parametrize(
    ("target", "field"),
    [
        ({"kind": "rpc", "service": "conversions"}, "target.method"),
        ({"kind": "rpc", "service": "a.b", "method": "x"}, "target.service"),
        ({"kind": "event", "event_type": "has space"}, "target.event_type"),
        ({"kind": "mail"}, "target"),
        (
            {"kind": "rpc", "service": "a", "method": "b", "kwargs": [1]},
            "target.kwargs",
        ),
    ],
)
def test_a_bad_target_is_refused_naming_the_field(target: Any, field: str) -> None:
    assert field in refusal({**VALID, "target": target})


def test_arguments_must_be_plain_json_of_bounded_size() -> None:
    big = {"kind": "event", "event_type": "x", "payload": {"blob": "x" * 70_000}}
    assert "at most" in refusal({**VALID, "target": big})["target.payload"]


def test_changes_are_validated_as_the_whole_schedule_they_produce() -> None:
    current = parse_schedule(VALID)
    changed = parse_changes(current, {"cron": "@hourly", "enabled": False})
    assert (changed.cron, changed.enabled, changed.name) == ("@hourly", False, "purge")
    with pytest.raises(InvalidSchedule) as caught:
        parse_changes(current, {"cron": "nope", "id": 3})
    assert set(caught.value.errors) == {"cron", "id"}


def test_preview_ids_and_pages_are_checked() -> None:
    assert parse_preview("*/5 * * * * *", "UTC").has_seconds
    with pytest.raises(InvalidSchedule, match="timezone"):
        parse_preview("* * * * *", "Mars/Base")
    with pytest.raises(InvalidSchedule):
        parse_schedule_id(True)
    with pytest.raises(InvalidSchedule) as caught:
        parse_page(0, 1000)
    assert set(caught.value.errors) == {"page", "per_page"}


def test_the_detail_shape_is_published_as_json_schema() -> None:
    schema = ScheduleDetail.model_json_schema()
    assert {"next_fire_times", "last_runs", "target"} <= set(schema["properties"])
