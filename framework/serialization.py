"""Which serializer outgoing messages use, and which content types consumers accept."""

from __future__ import annotations

import json
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
            raise ConfigurationError(
                f'Please register a serializer for "{name}" format'
            ) from None
    return SerializationConfig(serializer, list(accept))


def content_type_to_serializer(content_type: str | None, default: str) -> str:
    """The serializer name kombu registered for a content type (reply mirroring)."""
    if not content_type:
        return default
    return kombu.serialization.registry.type_to_name.get(content_type, default)


# -- encoding and decoding on the hot path ------------------------------------------------
# kombu's json codec builds an encoder object per message and runs a Python hook
# on every decoded dict, to support its type markers ({"__type__": ...}). For the
# plain payloads most messages carry, the standard library produces the same bytes
# faster; kombu's codec still handles everything else, so the wire is unchanged.

_JSON_CONTENT_TYPE = "application/json"
_TYPE_MARKER = b'"__type__"'
_json_dumps = json.dumps
_json_loads = json.loads


def dumps(payload: Any, serializer: str) -> tuple[str, str, bytes | str]:
    """``(content_type, content_encoding, body)`` for ``payload``."""
    if serializer == "json":
        try:
            return _JSON_CONTENT_TYPE, "utf-8", _json_dumps(payload)
        except TypeError:
            pass  # datetimes, decimals, uuids...: kombu's markers
    return kombu.serialization.dumps(payload, serializer=serializer)


def loads(
    body: bytes | str,
    content_type: str | None,
    content_encoding: str | None,
    accept: Any,
) -> Any:
    """Decode a message body, refusing content types outside ``accept``."""
    if content_type == _JSON_CONTENT_TYPE and (
        accept is None or _JSON_CONTENT_TYPE in accept
    ):
        raw = body.encode() if isinstance(body, str) else body
        if _TYPE_MARKER not in raw:
            return _json_loads(raw)
    return kombu.serialization.loads(
        body, content_type, content_encoding, accept=accept
    )
