"""A message py-amqp cannot encode is refused alone: later confirms still match."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import pytest

from framework.amqp.publish import Publisher


@pytest.fixture
def publisher(rabbit_config: dict[str, Any]) -> Iterator[Publisher]:
    instance = Publisher(rabbit_config)
    yield instance
    instance.close()


def test_an_unencodable_header_fails_its_publish_and_not_the_next_ones(
    publisher: Publisher,
) -> None:
    publisher.publish({"n": 0}, routing_key="nowhere", timeout=5, retry=False)
    # An AMQP table has no integer wider than 64 bits.
    with pytest.raises(struct.error):
        publisher.publish(
            {"n": 1}, routing_key="nowhere", headers={"big": 2**70}, retry=False
        )

    # Each is confirmed as itself: with the refused one still counted, every
    # later confirm would go to the message before it and the last would wait
    # for a confirm that never comes (timeout=2 makes that a failure).
    for n in range(2, 5):
        publisher.publish({"n": n}, routing_key="nowhere", timeout=2, retry=False)
    assert publisher._pending == {}
