"""The memory cache in front of a blob store: small blobs served from memory, bounded in
size, never stale for what goes through it, and streams for the rest."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shlhost.storage.blobs import CachingBlobStore, LocalBlobStore, make_blob_store


@pytest.fixture
def inner(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs")


def test_a_small_blob_is_served_from_memory_once_read(inner: LocalBlobStore, tmp_path: Path) -> None:
    cache = CachingBlobStore(inner, max_bytes=1 << 20)
    inner.put("links/a/f-1.jwe", b"token")
    assert cache.get("links/a/f-1.jwe") == b"token"
    (tmp_path / "blobs" / "links/a/f-1.jwe").unlink()  # gone from disk behind the cache's back
    assert cache.get("links/a/f-1.jwe") == b"token"
    with cache.open("links/a/f-1.jwe") as stream:
        assert stream.read() == b"token"
    assert cache.exists("links/a/f-1.jwe")


def test_writes_and_deletes_through_the_cache_are_never_stale(inner: LocalBlobStore) -> None:
    cache = CachingBlobStore(inner, max_bytes=1 << 20)
    cache.put("k", b"one")
    assert cache.get("k") == b"one"
    cache.put("k", b"two")
    assert cache.get("k") == b"two"
    with cache.writer("k") as out:
        out.write(b"three")
    assert cache.get("k") == b"three"
    cache.delete("k")
    with pytest.raises(KeyError):
        cache.get("k")
    with pytest.raises(KeyError):
        cache.open("k")


def test_large_blobs_stream_and_are_not_kept(inner: LocalBlobStore, tmp_path: Path) -> None:
    cache = CachingBlobStore(inner, max_bytes=1 << 20, max_item=1000)
    big = os.urandom(5000)
    inner.put("big", big)
    assert cache.get("big") == big
    (tmp_path / "blobs" / "big").unlink()
    with pytest.raises(KeyError):
        cache.get("big")  # it was not kept


def test_the_cache_stays_within_its_size_least_recently_used_first_out(inner: LocalBlobStore) -> None:
    cache = CachingBlobStore(inner, max_bytes=3000, max_item=1000)
    for name in "abcd":
        inner.put(name, name.encode() * 1000)
    for name in "abc":
        cache.get(name)
    cache.get("a")  # a is now the most recently used
    cache.get("d")  # over 3000 bytes: b, the least recently used, goes
    for name in "abcd":
        inner.delete(name)
    assert cache.get("a") == b"a" * 1000 and cache.get("c") == b"c" * 1000
    assert cache.get("d") == b"d" * 1000
    with pytest.raises(KeyError):
        cache.get("b")


def test_blob_cache_bytes_turns_it_on_and_off(tmp_path: Path) -> None:
    config = {"BLOB_BACKEND": "local", "BLOB_PATH": str(tmp_path)}
    assert isinstance(make_blob_store({**config, "BLOB_CACHE_BYTES": 1 << 20}), CachingBlobStore)
    assert isinstance(make_blob_store({**config, "BLOB_CACHE_BYTES": 0}), LocalBlobStore)
