"""LocalBlobStore: put/get/delete/exists/list, atomic writes, and key checking."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from shlhost.storage import blobs
from shlhost.storage.blobs import LocalBlobStore, check_key, make_blob_store


@pytest.fixture
def store(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs")


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.parent.rglob("*") if p.name.startswith(".tmp-")]


def test_root_is_created(tmp_path: Path) -> None:
    LocalBlobStore(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()


def test_put_get(store: LocalBlobStore) -> None:
    store.put("links/abc/f1-1.jwe", b"eyJ...ciphertext")
    assert store.get("links/abc/f1-1.jwe") == b"eyJ...ciphertext"
    assert (store.root / "links" / "abc" / "f1-1.jwe").read_bytes() == b"eyJ...ciphertext"


def test_put_overwrites(store: LocalBlobStore) -> None:
    store.put("k.jwe", b"old")
    store.put("k.jwe", b"new")
    assert store.get("k.jwe") == b"new"


def test_put_empty_and_large(store: LocalBlobStore) -> None:
    big = os.urandom(3 * 1024 * 1024)
    store.put("empty", b"")
    store.put("big", big)
    assert store.get("empty") == b""
    assert store.get("big") == big


def test_get_missing_is_a_key_error(store: LocalBlobStore) -> None:
    with pytest.raises(KeyError):
        store.get("links/none.jwe")


def test_exists_and_delete(store: LocalBlobStore) -> None:
    assert not store.exists("links/a/f.jwe")
    store.put("links/a/f.jwe", b"x")
    assert store.exists("links/a/f.jwe")
    assert not store.exists("links/a")  # a folder is not a blob
    store.delete("links/a/f.jwe")
    assert not store.exists("links/a/f.jwe")
    with pytest.raises(KeyError):
        store.get("links/a/f.jwe")
    store.delete("links/a/f.jwe")  # deleting twice is fine


def test_list_with_prefix_and_times(store: LocalBlobStore) -> None:
    before = datetime.now(UTC) - timedelta(seconds=5)
    store.put("links/a/f1-1.jwe", b"1")
    store.put("links/a/f2-1.jwe", b"2")
    store.put("links/b/f1-1.jwe", b"3")
    store.put("other/x", b"4")
    after = datetime.now(UTC) + timedelta(seconds=5)

    everything = dict(store.list())
    assert set(everything) == {"links/a/f1-1.jwe", "links/a/f2-1.jwe", "links/b/f1-1.jwe", "other/x"}
    for when in everything.values():
        assert when.tzinfo is not None
        assert before <= when <= after
    assert {k for k, _ in store.list("links/a/")} == {"links/a/f1-1.jwe", "links/a/f2-1.jwe"}
    assert {k for k, _ in store.list("links/")} == {"links/a/f1-1.jwe", "links/a/f2-1.jwe", "links/b/f1-1.jwe"}
    assert list(store.list("nothing/")) == []

    store.delete("links/a/f1-1.jwe")
    assert "links/a/f1-1.jwe" not in dict(store.list())


def test_list_reports_modification_time(store: LocalBlobStore) -> None:
    store.put("old", b"x")
    os.utime(store.root / "old", (1_600_000_000, 1_600_000_000))
    assert dict(store.list())["old"] == datetime.fromtimestamp(1_600_000_000, UTC)


def test_ping(store: LocalBlobStore) -> None:
    store.ping()


def test_make_blob_store(tmp_path: Path) -> None:
    store = make_blob_store({"BLOB_BACKEND": "local", "BLOB_PATH": str(tmp_path / "b")})
    assert isinstance(store, LocalBlobStore)
    with pytest.raises(ValueError):
        make_blob_store({"BLOB_BACKEND": "nope", "BLOB_PATH": str(tmp_path)})


# --- atomic writes -----------------------------------------------------------------------------


def test_no_temporary_files_after_success(store: LocalBlobStore) -> None:
    for i in range(5):
        store.put(f"links/a/f{i}.jwe", b"data" * 1000)
    store.put("links/a/f0.jwe", b"again")
    assert temp_files(store.root) == []
    assert sorted(p.name for p in (store.root / "links" / "a").iterdir()) == [f"f{i}.jwe" for i in range(5)]


def test_put_writes_a_complete_temporary_file_then_renames_it(
    store: LocalBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(100_000)
    real_replace = os.replace
    calls: list[tuple[str, str]] = []

    def checking_replace(src: str, dst: str) -> None:
        calls.append((str(src), str(dst)))
        assert Path(src).parent == Path(dst).parent  # same directory: rename is atomic
        assert Path(src).name.startswith(".tmp-")
        assert Path(src).read_bytes() == data  # fully written before it becomes visible
        assert not Path(dst).exists()  # readers have seen nothing yet
        real_replace(src, dst)

    monkeypatch.setattr(blobs.os, "replace", checking_replace)
    store.put("links/a/f.jwe", data)
    assert len(calls) == 1
    assert Path(calls[0][1]) == store.root / "links" / "a" / "f.jwe"
    assert store.get("links/a/f.jwe") == data


def test_failed_rename_leaves_old_content_and_no_temporary_file(
    store: LocalBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.put("links/a/f.jwe", b"old content")

    def failing_replace(src: str, dst: str) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(blobs.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk on fire"):
        store.put("links/a/f.jwe", b"new content")
    with pytest.raises(OSError, match="disk on fire"):
        store.put("links/a/new.jwe", b"never visible")
    monkeypatch.undo()

    assert store.get("links/a/f.jwe") == b"old content"
    assert not store.exists("links/a/new.jwe")
    assert temp_files(store.root) == []
    assert {k for k, _ in store.list()} == {"links/a/f.jwe"}


def test_failed_write_leaves_no_temporary_file(store: LocalBlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_fsync(fd: int) -> None:
        raise OSError("fsync failed")

    monkeypatch.setattr(blobs.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="fsync failed"):
        store.put("links/a/f.jwe", b"data")
    monkeypatch.undo()
    assert not store.exists("links/a/f.jwe")
    assert temp_files(store.root) == []


def test_interrupt_leaves_no_temporary_file(store: LocalBlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(src: str, dst: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(blobs.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.put("f.jwe", b"data")
    monkeypatch.undo()
    assert temp_files(store.root) == []


# --- keys ------------------------------------------------------------------------------------


BAD_KEYS = ["../x", "/abs", "a//b", "", "..", "a/..", "a/../b", "a/", "a b", "a\\b", "x/../../etc/passwd",
            "a\nb", "é", "~/x", "a/*"]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_invalid_keys_are_refused(store: LocalBlobStore, key: str) -> None:
    with pytest.raises(ValueError):
        check_key(key)
    with pytest.raises(ValueError):
        store.put(key, b"x")
    with pytest.raises(ValueError):
        store.get(key)
    with pytest.raises(ValueError):
        store.exists(key)
    with pytest.raises(ValueError):
        store.delete(key)


def test_invalid_keys_write_nothing(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "root")
    for key in BAD_KEYS:
        with pytest.raises(ValueError):
            store.put(key, b"x")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["root"]


@pytest.mark.parametrize("key", ["a", "links/abc/f1-1.jwe", "A-Z_0.9/x..y", ".hidden", "a/b/c/d/e"])
def test_valid_keys(store: LocalBlobStore, key: str) -> None:
    assert check_key(key) == key
    store.put(key, key.encode())
    assert store.get(key) == key.encode()


@pytest.mark.parametrize("key", [".", "a/./b", "a\n"])
def test_dot_segments_and_trailing_newline_are_refused(key: str) -> None:
    with pytest.raises(ValueError):
        check_key(key)
