"""``CredentialCache``: what a replica may answer without asking its database."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from framework.exceptions import ConfigurationError
from services.web.dependencies import CredentialCache, Principal, Settings


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def principal(user_id: int, session_id: str | None = None) -> Principal:
    return Principal(user_id, "member", "", "", "session", session_id, "csrf")


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_a_credential_is_answered_for_max_age_seconds_then_looked_up_again(
    clock: Clock,
) -> None:
    cache = CredentialCache(1.0, clock)
    cache.put("a", principal(1), cache.generation)

    clock.now += 0.99
    assert cache.get("a") == principal(1)
    clock.now += 0.01
    assert cache.get("a") is None


def test_a_session_is_not_answered_past_its_own_expiry(clock: Clock) -> None:
    cache = CredentialCache(1.0, clock)
    expires = datetime.fromtimestamp(clock.now + 0.5, UTC)
    cache.put("a", principal(1), cache.generation, expires)

    clock.now += 0.5
    assert cache.get("a") is None


def test_a_clock_set_back_forgets_what_was_read_in_its_future(clock: Clock) -> None:
    cache = CredentialCache(1.0, clock)
    cache.put("a", principal(1), cache.generation)

    clock.now -= 10
    assert cache.get("a") is None


def test_forgetting_a_user_or_a_session_forgets_only_theirs(clock: Clock) -> None:
    cache = CredentialCache(1.0, clock)
    for key, who in {
        "s1": principal(1, "one"),
        "s2": principal(1, "two"),
        "t1": principal(1),
        "s3": principal(2, "three"),
    }.items():
        cache.put(key, who, cache.generation)

    cache.forget_session("one")
    assert cache.get("s1") is None and cache.get("s2") is not None
    cache.forget_user(1)
    assert cache.get("s2") is None and cache.get("t1") is None
    assert cache.get("s3") == principal(2, "three")


def test_a_lookup_that_raced_a_revocation_is_not_kept(clock: Clock) -> None:
    cache = CredentialCache(1.0, clock)
    generation = cache.generation  # the lookup starts reading...
    cache.forget_user(1)  # ...a revocation commits and forgets...
    cache.put("a", principal(1), generation)  # ...the read, from before, ends

    assert cache.get("a") is None


def test_a_max_age_of_zero_keeps_nothing(clock: Clock) -> None:
    cache = CredentialCache(0.0, clock)
    cache.put("a", principal(1), cache.generation)

    assert cache.get("a") is None


def test_the_cache_holds_at_most_max_entries(clock: Clock) -> None:
    cache = CredentialCache(1.0, clock, max_entries=3)
    for key in "abcd":
        cache.put(key, principal(1), cache.generation)

    assert sum(cache.get(key) is not None for key in "abcd") <= 3
    assert cache.get("d") is not None


@pytest.mark.parametrize("seconds", ["-1", "11", "soon"])
def test_a_cache_bound_out_of_range_is_refused(seconds: str) -> None:
    with pytest.raises(ConfigurationError, match="CREDENTIAL_CACHE_SECONDS"):
        Settings.from_config({"CREDENTIAL_CACHE_SECONDS": seconds})
