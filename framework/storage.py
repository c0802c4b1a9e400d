"""File storage shared by services: generated keys over any fsspec URL.

``STORAGE_URL`` names where files live: a local folder by default (``./storage``),
or any fsspec URL (``s3://bucket/prefix``, ``memory://scratch``...) by configuration,
with ``STORAGE_OPTIONS`` (a mapping) passed to the filesystem (credentials, endpoint).

Keys are generated (``new_key``), never derived from a name a user typed: a key is a
flat, checked token, so no key can climb out of the storage root. Writers never
expose a partial file: ``open_write`` and ``staging_path`` write under a temporary
name beside the final one and move it into place only on success; on error (or a
cancel) the temporary file is removed. A process killed mid-write leaves a
``*.partial-*`` file behind, which ``remove_stale_partials`` clears.

``FileStorage`` works anywhere (scripts, tests, child processes); ``Storage`` is the
dependency provider injecting one per container.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from framework.exceptions import ConfigurationError
from framework.extensions import DependencyProvider

if TYPE_CHECKING:
    from framework.containers import WorkerContext

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_STORAGE_URL",
    "STORAGE_OPTIONS_CONFIG_KEY",
    "STORAGE_URL_CONFIG_KEY",
    "FileStorage",
    "InvalidStorageKey",
    "Storage",
    "StorageKeyNotFound",
]

STORAGE_URL_CONFIG_KEY = "STORAGE_URL"
STORAGE_OPTIONS_CONFIG_KEY = "STORAGE_OPTIONS"
DEFAULT_STORAGE_URL = "./storage"

PARTIAL_MARKER = ".partial-"
# A key: a flat name of safe characters. No separators, no leading dot, so it can
# neither name a folder outside the root nor collide with a temporary file.
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}(\.[A-Za-z0-9]{1,16}){0,3}$")
_SUFFIX = re.compile(r"^(\.[A-Za-z0-9]{1,16}){0,3}$")
_COPY_CHUNK = 1 << 20


class InvalidStorageKey(ValueError):
    """The key is not one ``new_key`` could have made (or a suffix is unsafe)."""


class StorageKeyNotFound(FileNotFoundError):
    """Nothing is stored under the key."""


class FileStorage:
    """Files under one fsspec URL, addressed by generated keys."""

    def __init__(
        self, url: str = DEFAULT_STORAGE_URL, options: dict[str, Any] | None = None
    ) -> None:
        self.url = url
        self.options = dict(options or {})
        fs, root = fsspec.core.url_to_fs(url, **self.options)
        self.fs: fsspec.AbstractFileSystem = fs
        self.root = str(root).rstrip("/") or "/"
        self.is_local = isinstance(fs, LocalFileSystem)
        if self.is_local:
            os.makedirs(self.root, exist_ok=True)
        else:
            # Object stores have no folders; makedirs is a no-op there, but memory://
            # and others want the parent to exist before a write.
            with contextlib.suppress(Exception):
                self.fs.makedirs(self.root, exist_ok=True)

    def __repr__(self) -> str:
        return f"<FileStorage {self.fs.protocol!r} root={self.root!r}>"

    # -- keys ------------------------------------------------------------------------

    @staticmethod
    def new_key(suffix: str = "") -> str:
        """A fresh random key, e.g. ``new_key(".parquet")``; the suffix is checked."""
        if not _SUFFIX.match(suffix):
            raise InvalidStorageKey(
                "a key suffix is up to three dot-separated alphanumeric extensions, "
                f"such as '.csv.gz'; got {suffix!r}"
            )
        return uuid.uuid4().hex + suffix

    @staticmethod
    def check_key(key: Any) -> str:
        if not isinstance(key, str) or not _KEY.match(key) or PARTIAL_MARKER in key:
            raise InvalidStorageKey(f"not a storage key: {key!r}")
        return key

    def _path(self, key: Any) -> str:
        return f"{self.root}/{self.check_key(key)}"

    def _partial_path(self, key: str) -> str:
        return f"{self._path(key)}{PARTIAL_MARKER}{uuid.uuid4().hex}"

    # -- reading ---------------------------------------------------------------------

    def open_read(self, key: str) -> IO[bytes]:
        path = self._path(key)
        try:
            return self.fs.open(path, "rb")
        except FileNotFoundError:
            raise StorageKeyNotFound(f"no stored file {key}") from None

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self._path(key)))

    def size(self, key: str) -> int:
        try:
            return int(self.fs.size(self._path(key)))
        except FileNotFoundError:
            raise StorageKeyNotFound(f"no stored file {key}") from None

    def local_path(self, key: str) -> str | None:
        """The file's path on this machine's filesystem, or None when not local."""
        path = self._path(key)
        return path if self.is_local else None

    # -- writing ---------------------------------------------------------------------

    @contextlib.contextmanager
    def open_write(self, key: str) -> Iterator[IO[bytes]]:
        """A binary file to write ``key``'s content to; in place only on success."""
        final = self._path(key)
        partial = self._partial_path(key)
        try:
            with self.fs.open(partial, "wb") as stream:
                yield stream
            self._move(partial, final)
        except BaseException:
            self._remove_quietly(partial)
            raise

    @contextlib.contextmanager
    def staging_path(self, key: str) -> Iterator[str]:
        """A local path to write ``key`` to (for engines that only write paths).

        On a local storage it is a temporary name beside the final one, renamed
        into place on success; elsewhere a local temporary file uploaded on
        success. Either way, on error nothing is left behind.
        """
        final = self._path(key)
        if self.is_local:
            partial = self._partial_path(key)
            try:
                yield partial
                self._move(partial, final)
            except BaseException:
                self._remove_quietly(partial)
                raise
            return
        folder = tempfile.mkdtemp(prefix="storage-")
        try:
            local = os.path.join(folder, self.check_key(key))
            yield local
            with open(local, "rb") as source, self.open_write(key) as target:
                shutil.copyfileobj(source, target, _COPY_CHUNK)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def write_bytes(self, key: str, data: bytes) -> None:
        with self.open_write(key) as stream:
            stream.write(data)

    def delete(self, key: str) -> bool:
        """Remove the file; False if there was none."""
        path = self._path(key)
        try:
            self.fs.rm(path)
        except FileNotFoundError:
            return False
        return True

    def remove_partials(self, key: str) -> int:
        """Remove temporary files left for ``key`` by writers that died; how many.

        For a writer about to write ``key`` again after a crash: only one writer
        of a key may run at a time, so every partial of it is dead.
        """
        prefix = f"{self.check_key(key)}{PARTIAL_MARKER}"
        removed = 0
        for name in self.fs.ls(self.root, detail=False):
            if str(name).rstrip("/").rsplit("/", 1)[-1].startswith(prefix):
                self._remove_quietly(str(name))
                removed += 1
        return removed

    def remove_stale_partials(self, older_than_seconds: float) -> int:
        """Remove temporary files of writers that died (``kill -9``); how many."""
        cutoff = time.time() - older_than_seconds
        removed = 0
        for info in self.fs.ls(self.root, detail=True):
            name = str(info["name"]).rstrip("/").rsplit("/", 1)[-1]
            if PARTIAL_MARKER not in name:
                continue
            modified = _modified(info)
            if modified is not None and modified > cutoff:
                continue
            self._remove_quietly(str(info["name"]))
            removed += 1
        return removed

    def _move(self, source: str, target: str) -> None:
        if self.is_local:
            # Atomic on one filesystem: a reader sees the old state or the whole file.
            os.replace(source, target)
        else:
            self.fs.mv(source, target)

    def _remove_quietly(self, path: str) -> None:
        try:
            self.fs.rm(path)
        except FileNotFoundError:
            pass
        except Exception:
            log.warning("could not remove a temporary file", extra={"path": path})


def _modified(info: dict[str, Any]) -> float | None:
    for field in ("mtime", "LastModified", "created"):
        value = info.get(field)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        with contextlib.suppress(TypeError, ValueError):
            return float(value)
    return None


class Storage(DependencyProvider):
    """Injects the container's ``FileStorage`` (``STORAGE_URL``, ``STORAGE_OPTIONS``)."""

    storage: FileStorage

    def setup(self) -> None:
        config = self.container.config
        url = config.get(STORAGE_URL_CONFIG_KEY) or DEFAULT_STORAGE_URL
        options = config.get(STORAGE_OPTIONS_CONFIG_KEY) or {}
        if not isinstance(options, dict):
            raise ConfigurationError(f"{STORAGE_OPTIONS_CONFIG_KEY} must be a mapping")
        try:
            self.storage = FileStorage(str(url), options)
        except (ValueError, ImportError, OSError) as exc:
            raise ConfigurationError(
                f"{STORAGE_URL_CONFIG_KEY} cannot be used: {exc}"
            ) from None

    def get_dependency(self, worker_ctx: WorkerContext) -> FileStorage:
        return self.storage
