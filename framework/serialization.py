"""Which serializer outgoing messages use, and which content types consumers accept."""

from __future__ import annotations

from typing import Any, NamedTuple

import kombu.serialization

from framework.constants import (
    ACCEPT_CONFIG_KEY,
    DEFAULT_SERIALIZER,
    SERIALIZER_CONFIG_KEY,
    SERIALIZERS_CONFIG_KEY,
)
from framework.exceptions import ConfigurationError
from framework.utils import import_from_path


class SerializationConfig(NamedTuple):
    serializer: str
    accept: list[str]


def setup(config: dict[str, Any]) -> SerializationConfig:
    """Register the custom serializers in ``SERIALIZERS`` and validate the choice."""
    for name, spec in (config.get(SERIALIZERS_CONFIG_KEY) or {}).items():
        kombu.serialization.register(
            name,
            encoder=import_from_path(spec["encoder"]),
            decoder=import_from_path(spec["decoder"]),
            content_type=spec["content_type"],
            content_encoding=spec.get("content_encoding", "utf-8"),
        )
    serializer = config.get(SERIALIZER_CONFIG_KEY, DEFAULT_SERIALIZER)
    accept = config.get(ACCEPT_CONFIG_KEY) or [serializer]
    for name in [serializer, *accept]:
        try:
            kombu.serialization.registry.name_to_type[name]
        except KeyError:
            raise ConfigurationError(f'Please register a serializer for "{name}" format') from None
    return SerializationConfig(serializer, list(accept))


def content_type_to_serializer(content_type: str | None, default: str) -> str:
    """The serializer name kombu registered for a content type (reply mirroring)."""
    if not content_type:
        return default
    return kombu.serialization.registry.type_to_name.get(content_type, default)
