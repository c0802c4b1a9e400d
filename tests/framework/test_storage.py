"""``framework.storage``: generated keys, atomic writes, local and non-local fsspec."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from framework.exceptions import ConfigurationError
from framework.storage import (
    STORAGE_URL_CONFIG_KEY,
    FileStorage,
    InvalidStorageKey,
    Storage,
    StorageKeyNotFound,
)


@pytest.fixture
def local(tmp_path: Path) -> FileStorage:
    return FileStorage(str(tmp_path / "store"))


@pytest.fixture
def memory() -> FileStorage:
    # A fresh root per test: fsspec's memory filesystem is one per process.
    return FileStorage(f"memory://test-{uuid.uuid4().hex}")


@pytest.fixture(params=["local", "memory"])
def storage(request: pytest.FixtureRequest) -> FileStorage:
    return request.getfixturevalue(request.param)


def listing(storage: FileStorage) -> list[str]:
    return sorted(
        str(name).rsplit("/", 1)[-1]
        for name in storage.fs.ls(storage.root, detail=False)
    )


def test_new_keys_are_random_and_keep_a_checked_suffix() -> None:
    first, second = FileStorage.new_key(".csv.gz"), FileStorage.new_key(".csv.gz")

    assert first != second
    assert first.endswith(".csv.gz")
    assert FileStorage.check_key(first) == first


@pytest.mark.parametrize("suffix", ["/x", "../x", ".c/v", ".a b", "csv"])
def test_an_unsafe_suffix_is_refused(suffix: str) -> None:
    with pytest.raises(InvalidStorageKey):
        FileStorage.new_key(suffix)


@pytest.mark.parametrize(
    "key", ["../etc/passwd", "/abs", "a/b", ".hidden", "", None, 7, "x.partial-1"]
)
def test_keys_that_could_escape_the_root_are_refused(
    storage: FileStorage, key: Any
) -> None:
    with pytest.raises(InvalidStorageKey):
        storage.exists(key)
    with pytest.raises(InvalidStorageKey):
        storage.open_read(key)


def test_written_bytes_read_back_with_their_size(storage: FileStorage) -> None:
    key = storage.new_key(".bin")
    with storage.open_write(key) as stream:
        stream.write(b"hello ")
        stream.write(b"world")

    assert storage.exists(key)
    assert storage.size(key) == 11
    with storage.open_read(key) as stream:
        assert stream.read() == b"hello world"
    assert listing(storage) == [key]


def test_a_failed_write_leaves_neither_the_file_nor_a_temporary(
    storage: FileStorage,
) -> None:
    key = storage.new_key()

    with pytest.raises(RuntimeError), storage.open_write(key) as stream:
        stream.write(b"half")
        raise RuntimeError("writer failed")

    assert not storage.exists(key)
    assert listing(storage) == []


def test_a_file_being_written_is_not_visible_under_its_key(
    storage: FileStorage,
) -> None:
    key = storage.new_key()
    with storage.open_write(key) as stream:
        stream.write(b"partial")
        stream.flush()
        assert not storage.exists(key)
    assert storage.exists(key)


def test_staging_path_moves_the_file_into_place_only_on_success(
    storage: FileStorage,
) -> None:
    done, failed = storage.new_key(), storage.new_key()
    with storage.staging_path(done) as path:
        Path(path).write_bytes(b"complete")
        assert not storage.exists(done)
    with pytest.raises(ValueError), storage.staging_path(failed) as path:
        Path(path).write_bytes(b"partial")
        raise ValueError("engine failed")

    with storage.open_read(done) as stream:
        assert stream.read() == b"complete"
    assert listing(storage) == [done]


def test_local_path_is_given_only_for_local_storage(
    local: FileStorage, memory: FileStorage
) -> None:
    key = local.new_key()
    local.write_bytes(key, b"x")

    path = local.local_path(key)
    assert path is not None and Path(path).read_bytes() == b"x"
    assert memory.local_path(memory.new_key()) is None


def test_missing_files_are_reported_by_name(storage: FileStorage) -> None:
    key = storage.new_key()

    with pytest.raises(StorageKeyNotFound, match=key):
        storage.open_read(key)
    with pytest.raises(StorageKeyNotFound):
        storage.size(key)
    assert storage.delete(key) is False


def test_delete_removes_the_file(storage: FileStorage) -> None:
    key = storage.new_key()
    storage.write_bytes(key, b"x")

    assert storage.delete(key) is True
    assert not storage.exists(key)


def test_stale_partials_of_a_dead_writer_are_removed(local: FileStorage) -> None:
    kept = local.new_key()
    local.write_bytes(kept, b"x")
    stale = Path(local.root) / f"{local.new_key()}.partial-dead"
    stale.write_bytes(b"half")
    fresh = Path(local.root) / f"{local.new_key()}.partial-live"
    fresh.write_bytes(b"half")
    os.utime(stale, (1, 1))

    assert local.remove_stale_partials(older_than_seconds=3600) == 1

    assert not stale.exists() and fresh.exists()
    assert local.exists(kept)


def test_partials_of_one_key_are_removed_and_no_others(local: FileStorage) -> None:
    key, other = local.new_key(), local.new_key()
    (Path(local.root) / f"{key}.partial-a").write_bytes(b"half")
    (Path(local.root) / f"{other}.partial-b").write_bytes(b"half")
    local.write_bytes(key, b"whole")

    assert local.remove_partials(key) == 1

    assert listing(local) == sorted([key, f"{other}.partial-b"])


def test_the_provider_injects_storage_at_the_configured_url(
    mock_container: Any, tmp_path: Path
) -> None:
    mock_container.config[STORAGE_URL_CONFIG_KEY] = str(tmp_path)
    provider = Storage().bind(mock_container, "storage")
    provider.setup()
    storage = provider.get_dependency(None)  # type: ignore[arg-type]

    assert isinstance(storage, FileStorage)
    assert storage.root == str(tmp_path)


def test_a_storage_url_with_an_unknown_protocol_stops_setup(
    mock_container: Any,
) -> None:
    mock_container.config[STORAGE_URL_CONFIG_KEY] = "nosuch://x"
    provider = Storage().bind(mock_container, "storage")

    with pytest.raises(ConfigurationError, match="STORAGE_URL"):
        provider.setup()
