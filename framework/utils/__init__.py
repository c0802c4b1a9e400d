"""Small helpers with no better home."""

from __future__ import annotations

import inspect
import os
import pydoc
import random
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REDACTED = "********"

# A generator of our own: user code seeding the global one (tests do) must not
# make ids repeat. Reseeded in forked children, which would otherwise share it.
_ids = random.Random()
_getrandbits = _ids.getrandbits
os.register_at_fork(after_in_child=_ids.seed)
_UUID4_VERSION_AND_VARIANT = (0x4 << 76) | (0x2 << 62)
_UUID4_CLEAR = ~((0xF << 76) | (0x3 << 62))


def uuid4_str() -> str:
    """A random version-4 UUID string, for ids (call ids, correlation ids).

    ``str(uuid.uuid4())`` costs a system call and an object per id, several times
    per RPC; ids need to be unique, not unpredictable, so a PRNG seeded from the OS
    does.
    """
    value = (_getrandbits(128) & _UUID4_CLEAR) | _UUID4_VERSION_AND_VARIANT
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def import_from_path(path: str | None) -> Any:
    """The object at a dotted path, ``None`` for ``None``; ``ImportError`` if missing."""
    if path is None:
        return None
    obj = pydoc.locate(path)
    if obj is None:
        raise ImportError(f"`{path}` could not be imported")
    return obj


def sanitize_url(url: str) -> str:
    """The URL with its password replaced, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", f":{REDACTED}@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


_PATH_TOKEN = re.compile(r"\.?([^.\[\]]+)|\[(\d+)\]")


def get_redacted_args(entrypoint: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """The call's arguments by name, with the entrypoint's sensitive ones masked.

    A sensitive path is ``arg``, ``arg.key``, ``arg[1]`` or any mix such as
    ``arg.key[0].field``; ``*args`` and ``**kwargs`` parameters are reached by
    their names too. Paths that match nothing are ignored. The arguments are
    copied (tuples become lists), never modified. Raises ``TypeError`` when the
    arguments do not fit the method's signature.
    """
    method = getattr(entrypoint.container.service_cls, entrypoint.method_name)
    bound = inspect.signature(method).bind(None, *args, **kwargs)
    arguments = dict(bound.arguments)
    arguments.pop(next(iter(bound.arguments)), None)  # self
    callargs: dict[str, Any] = _copy_containers(arguments)
    sensitive = entrypoint.sensitive_arguments
    if isinstance(sensitive, str):
        sensitive = (sensitive,)
    for path in sensitive:
        tokens: list[str | int] = [
            key if key else int(index) for key, index in _PATH_TOKEN.findall(path)
        ]
        if tokens:
            _redact(callargs, tokens)
    return callargs


def _copy_containers(value: Any) -> Any:
    # Only the containers a path can walk through are copied; leaves are never
    # mutated, and deep-copying arbitrary objects can fail or be slow.
    if isinstance(value, dict):
        return {key: _copy_containers(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_copy_containers(item) for item in value]
    return value


def _redact(target: Any, tokens: list[str | int]) -> None:
    for position, token in enumerate(tokens):
        if isinstance(target, list):
            if isinstance(token, str):
                if not token.isdigit():
                    return
                token = int(token)
            if not -len(target) <= token < len(target):
                return
        elif not isinstance(target, dict) or token not in target:
            return
        if position == len(tokens) - 1:
            target[token] = REDACTED
        else:
            target = target[token]
