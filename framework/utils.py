"""Small helpers with no better home."""

from __future__ import annotations

import copy
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

    A sensitive path is ``arg``, ``arg.key`` or ``arg.key[1]``; paths that match
    nothing are ignored.
    """
    method = getattr(entrypoint.container.service_cls, entrypoint.method_name)
    bound = inspect.signature(method).bind(None, *args, **kwargs)
    callargs = copy.deepcopy(dict(bound.arguments))
    callargs.pop(next(iter(bound.arguments)), None)  # self
    sensitive = entrypoint.sensitive_arguments
    if isinstance(sensitive, str):
        sensitive = (sensitive,)
    for path in sensitive:
        tokens = [
            key if key is not None else int(idx)
            for key, idx in _PATH_TOKEN.findall(path)
        ]
        _redact(callargs, tokens)
    return callargs


def _redact(target: Any, tokens: list[Any]) -> None:
    for token in tokens[:-1]:
        try:
            target = target[token]
        except (KeyError, IndexError, TypeError):
            return
    try:
        if tokens[-1] in target or isinstance(target, list):
            target[tokens[-1]] = REDACTED
    except (KeyError, IndexError, TypeError):
        return
