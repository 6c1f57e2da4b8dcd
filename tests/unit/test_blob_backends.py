"""One contract, three backends: local files, the database's ``blobs`` table, and S3 (a real
S3 API server, moto's server mode, started by the tests). Then what is particular to each:
the database store's own transactions and keyset pages, S3's prefix and missing bucket,
and errors that are ``OSError``s on every backend."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from shlhost.storage.blobs import (
    BlobStore,
    BlobStoreError,
    DatabaseBlobStore,
    LocalBlobStore,
    S3BlobStore,
    make_blob_store,
)
from shlhost.storage.db import make_engine
from shlhost.storage.models import Blob
from tests.conftest import S3Server, free_port


@pytest.fixture(scope="module")
def engine(database_url: str) -> Iterator[Any]:
    eng = make_engine(database_url)
    yield eng
    eng.dispose()


@pytest.fixture(scope="module")
def shared_s3_store(s3_server: S3Server) -> S3BlobStore:
    """One bucket and client for the module (making a boto3 client takes a while); tests
    keep apart by key prefix."""
    return S3BlobStore(
        s3_server.new_bucket(),
        prefix="some/prefix",
        endpoint_url=s3_server.endpoint,
        region="us-east-1",
    )


@pytest.fixture
def unique() -> str:
    """A key prefix of our own: the database and the session's S3 server are shared."""
    return f"t{os.urandom(6).hex()}/"


@pytest.fixture(params=["local", "database", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "local":
        return LocalBlobStore(tmp_path / "blobs")
    if request.param == "database":
        return DatabaseBlobStore(request.getfixturevalue("engine"))
    s3_store: S3BlobStore = request.getfixturevalue("shared_s3_store")
    return s3_store


# --- the contract -------------------------------------------------------------------------


def test_put_get_overwrite(store: BlobStore, unique: str) -> None:
    key = unique + "links/abc/f1-1.jwe"
    store.put(key, b"eyJ...ciphertext")
    assert store.get(key) == b"eyJ...ciphertext"
    store.put(key, b"new")
    assert store.get(key) == b"new"


def test_empty_large_and_binary(store: BlobStore, unique: str) -> None:
    big = os.urandom(3 * 1024 * 1024)
    store.put(unique + "empty", b"")
    store.put(unique + "big", big)
    store.put(unique + "bin", bytes(range(256)))
    assert store.get(unique + "empty") == b""
    assert store.get(unique + "big") == big
    assert store.get(unique + "bin") == bytes(range(256))


def test_writer_commits_whole_and_open_streams(store: BlobStore, unique: str) -> None:
    """Large blobs go in and out as streams: ``writer`` commits when its block ends, ``open``
    reads in pieces. 9 MiB crosses boto3's multipart threshold (8 MiB) on S3."""
    key = unique + "links/big/f1-1.jwe"
    pieces = [os.urandom(1 << 20) for _ in range(9)]
    with store.writer(key) as out:
        for piece in pieces:
            out.write(piece)
        assert not store.exists(key), "visible before the block ended"
    with store.open(key) as stream:
        read = [stream.read(1 << 20) for _ in range(10)]
    assert b"".join(read) == b"".join(pieces) and read[-1] == b""


def test_writer_that_raises_leaves_nothing(store: BlobStore, unique: str) -> None:
    key = unique + "links/x/f1-1.jwe"
    store.put(key, b"old")
    with pytest.raises(RuntimeError), store.writer(key) as out:
        out.write(b"half of a new blob")
        raise RuntimeError("the encryption failed")
    assert store.get(key) == b"old"
    fresh = unique + "links/x/f2-1.jwe"
    with pytest.raises(RuntimeError), store.writer(fresh) as out:
        out.write(b"half")
        raise RuntimeError("the encryption failed")
    assert not store.exists(fresh)
    assert sorted(k for k, _ in store.list(unique)) == [key], "no temporary file left behind"


def test_open_missing_is_a_key_error(store: BlobStore, unique: str) -> None:
    with pytest.raises(KeyError):
        store.open(unique + "nope")


def test_missing_is_a_key_error(store: BlobStore, unique: str) -> None:
    with pytest.raises(KeyError):
        store.get(unique + "links/none.jwe")
    assert not store.exists(unique + "links/none.jwe")


def test_exists_and_delete(store: BlobStore, unique: str) -> None:
    key = unique + "links/a/f.jwe"
    assert not store.exists(key)
    store.put(key, b"x")
    assert store.exists(key)
    assert not store.exists(unique + "links/a")  # a "folder" is not a blob
    store.delete(key)
    assert not store.exists(key)
    with pytest.raises(KeyError):
        store.get(key)
    store.delete(key)  # deleting twice is fine


def test_list_by_prefix_with_times(store: BlobStore, unique: str) -> None:
    before = datetime.now(UTC) - timedelta(seconds=5)
    for key in ("links/a/f1-1.jwe", "links/a/f2-1.jwe", "links/b/f1-1.jwe", "other/x"):
        store.put(unique + key, b"1")
    after = datetime.now(UTC) + timedelta(seconds=5)

    everything = dict(store.list(unique))
    assert set(everything) == {
        unique + k for k in ("links/a/f1-1.jwe", "links/a/f2-1.jwe", "links/b/f1-1.jwe", "other/x")
    }
    for when in everything.values():
        assert when.tzinfo is not None
        assert before <= when <= after
    assert {k for k, _ in store.list(unique + "links/a/")} == {
        unique + "links/a/f1-1.jwe",
        unique + "links/a/f2-1.jwe",
    }
    assert list(store.list(unique + "nothing/")) == []
    store.delete(unique + "links/a/f1-1.jwe")
    assert unique + "links/a/f1-1.jwe" not in dict(store.list(unique))


def test_list_prefix_is_literal(store: BlobStore, unique: str) -> None:
    """``_`` and ``.`` are ordinary characters in a prefix (no LIKE or regex wildcards)."""
    store.put(unique + "a_b/1", b"1")
    store.put(unique + "aXb/2", b"2")
    store.put(unique + "a.c/3", b"3")
    store.put(unique + "aZc/4", b"4")
    assert [k for k, _ in store.list(unique + "a_")] == [unique + "a_b/1"]
    assert [k for k, _ in store.list(unique + "a.")] == [unique + "a.c/3"]


@pytest.mark.parametrize("key", ["../x", "/abs", "a//b", "", "a/../b", "a b", "a\\b", "é", "a/*"])
def test_invalid_keys_are_refused(store: BlobStore, key: str) -> None:
    for call in (
        lambda: store.put(key, b"x"),
        lambda: store.get(key),
        lambda: store.exists(key),
        lambda: store.delete(key),
    ):
        with pytest.raises(ValueError):
            call()


def test_ping(store: BlobStore) -> None:
    store.ping()


def test_readers_never_see_a_half_written_blob(store: BlobStore, unique: str) -> None:
    """A reader racing a writer that keeps replacing 1 MiB blobs sees one whole version or
    the other, never a mixture or a truncated one."""
    key = unique + "links/race/f.jwe"
    versions = [bytes([65 + i]) * (1024 * 1024) for i in range(3)]
    store.put(key, versions[0])
    stop = threading.Event()
    seen: list[bytes] = []
    errors: list[BaseException] = []

    def read() -> None:
        try:
            while not stop.is_set():
                seen.append(store.get(key))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(12):
            store.put(key, versions[i % 3])
    finally:
        stop.set()
        reader.join(30)
    assert errors == []
    assert seen, "the reader read nothing"
    assert all(blob in versions for blob in seen), {len(b) for b in seen}


# --- the database store ---------------------------------------------------------------------


def test_database_blob_is_committed_by_put(engine: Any, database_url: str, unique: str) -> None:
    """Visible at once to any other connection: put commits its own transaction."""
    DatabaseBlobStore(engine).put(unique + "k", b"data")
    other = make_engine(database_url)
    try:
        with other.connect() as conn:
            row = conn.execute(
                select(Blob.data, Blob.created_at).where(Blob.key == unique + "k")
            ).one()
    finally:
        other.dispose()
    assert bytes(row.data) == b"data"
    assert abs(row.created_at - datetime.now(UTC)) < timedelta(seconds=30)


def test_database_blob_survives_the_callers_rollback(engine: Any, unique: str) -> None:
    """The caller's transaction rolling back (a failed upload) does not take the blob with it,
    and the blob does not wait for the caller's commit: gc sweeps such orphans later."""
    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite has one writer: a caller must not hold a write transaction during put")
    store = DatabaseBlobStore(engine)
    with Session(engine) as session:
        session.execute(text("SELECT 1"))  # the caller's transaction is open
        store.put(unique + "k", b"data")
        assert store.get(unique + "k") == b"data"
        session.rollback()
    assert store.get(unique + "k") == b"data"


def test_database_list_pages_and_tolerates_deletes(
    engine: Any, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = DatabaseBlobStore(engine)
    monkeypatch.setattr(DatabaseBlobStore, "PAGE", 3)
    keys = [f"{unique}k{i:02}" for i in range(10)]
    for key in keys:
        store.put(key, b"x")
    listed = []
    for key, _when in store.list(unique):
        listed.append(key)
        store.delete(key)  # what gc does between pages
    assert listed == keys
    assert list(store.list(unique)) == []


def test_database_put_keeps_one_row_per_key(engine: Any, unique: str) -> None:
    store = DatabaseBlobStore(engine)
    store.put(unique + "k", b"one")
    store.put(unique + "k", b"two")
    with engine.connect() as conn:
        rows = conn.execute(select(Blob.data).where(Blob.key == unique + "k")).all()
    assert [bytes(r.data) for r in rows] == [b"two"]


def test_database_unreachable_is_a_blob_store_error(tmp_path: Path) -> None:
    engine = make_engine(f"postgresql://nobody@127.0.0.1:{free_port()}/none", pool_pre_ping=False)
    store = DatabaseBlobStore(engine)
    try:
        for call in (
            store.ping,
            lambda: store.put("k", b"x"),
            lambda: store.get("k"),
            lambda: store.delete("k"),
        ):
            with pytest.raises(BlobStoreError) as info:
                call()
            assert isinstance(info.value, OSError)
    finally:
        engine.dispose()


def test_database_without_the_blobs_table_fails_ping(tmp_path: Path) -> None:
    engine = make_engine("sqlite:///" + str(tmp_path / "empty.db"))
    try:
        with pytest.raises(BlobStoreError):
            DatabaseBlobStore(engine).ping()
    finally:
        engine.dispose()


# --- the S3 store -----------------------------------------------------------------------------


def test_s3_objects_live_under_the_prefix(s3_server: S3Server) -> None:
    bucket = s3_server.new_bucket()
    store = S3BlobStore(
        bucket, prefix="/deploy-a/", endpoint_url=s3_server.endpoint, region="us-east-1"
    )
    store.put("links/x/f.jwe", b"jwe")
    raw = s3_server.client()
    assert [o["Key"] for o in raw.list_objects_v2(Bucket=bucket)["Contents"]] == [
        "deploy-a/links/x/f.jwe"
    ]
    assert raw.get_object(Bucket=bucket, Key="deploy-a/links/x/f.jwe")["Body"].read() == b"jwe"
    # Another deployment's prefix in the same bucket is invisible, and never listed.
    raw.put_object(Bucket=bucket, Key="deploy-b/links/y/g.jwe", Body=b"theirs")
    raw.put_object(Bucket=bucket, Key="deploy-a/links/../odd key", Body=b"not ours")
    assert [k for k, _ in store.list("")] == ["links/x/f.jwe"]
    assert not store.exists("links/y/g.jwe")


def test_s3_missing_bucket_fails_ping_and_put(s3_server: S3Server) -> None:
    store = S3BlobStore("no-such-bucket-here", endpoint_url=s3_server.endpoint, region="us-east-1")
    with pytest.raises(BlobStoreError):
        store.ping()
    with pytest.raises(BlobStoreError):
        store.put("k", b"x")


def test_s3_unreachable_is_a_blob_store_error(s3_server: S3Server) -> None:
    store = S3BlobStore(
        "bucket", endpoint_url=f"http://127.0.0.1:{free_port()}", region="us-east-1"
    )
    with pytest.raises(BlobStoreError) as info:
        store.ping()
    assert isinstance(info.value, OSError)
    with pytest.raises(BlobStoreError):
        store.get("k")


# --- configuration ------------------------------------------------------------------------------


def test_make_blob_store_by_backend(tmp_path: Path, engine: Any, s3_server: S3Server) -> None:
    assert isinstance(
        make_blob_store({"BLOB_BACKEND": "local", "BLOB_PATH": str(tmp_path)}), LocalBlobStore
    )
    db_store = make_blob_store({"BLOB_BACKEND": "database"}, engine)
    assert isinstance(db_store, DatabaseBlobStore) and db_store.engine is engine
    s3 = make_blob_store(
        {
            "BLOB_BACKEND": "s3",
            "S3_BUCKET": "b",
            "S3_PREFIX": "p",
            "S3_ENDPOINT_URL": s3_server.endpoint,
            "S3_REGION": "eu-west-1",
        }
    )
    assert isinstance(s3, S3BlobStore)
    assert (s3.bucket, s3.prefix, s3.client.meta.region_name) == ("b", "p/", "eu-west-1")
    with pytest.raises(ValueError):
        make_blob_store({"BLOB_BACKEND": "database"})
    with pytest.raises(ValueError):
        make_blob_store({"BLOB_BACKEND": "ftp"})


# --- the migration ------------------------------------------------------------------------------


def test_migration_0002_creates_and_drops_the_blobs_table(tmp_path: Path) -> None:
    from alembic import command
    from sqlalchemy import inspect

    from shlhost.storage import migrate

    engine = make_engine("sqlite:///" + str(tmp_path / "m.db"))
    try:
        migrate.upgrade(engine, "0002")
        columns = {c["name"]: c for c in inspect(engine).get_columns("blobs")}
        assert set(columns) == {"key", "data", "created_at"}
        assert not any(c["nullable"] for c in columns.values())
        assert inspect(engine).get_pk_constraint("blobs")["constrained_columns"] == ["key"]
        DatabaseBlobStore(engine).put("k", b"v")
        cfg = migrate.alembic_config()
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0001")
        assert "blobs" not in inspect(engine).get_table_names()
        assert "links" in inspect(engine).get_table_names()
    finally:
        engine.dispose()
