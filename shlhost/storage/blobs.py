"""Blob storage behind one small interface. Writes are atomic: a reader sees all or nothing.

Three backends, chosen by ``BLOB_BACKEND``: ``local`` (files under ``BLOB_PATH``, the
default), ``database`` (the ``blobs`` table, each write in its own transaction) and ``s3``
(any S3-compatible endpoint through boto3; ``put_object`` is atomic).

Blobs can be large (records with imaging run to hundreds of megabytes), so besides
``put``/``get`` of bytes every backend has ``writer`` (a file to write into, committed whole
when the block ends) and ``open`` (a stream to read from). The local and S3 backends stream
through them in constant memory; the database backend holds one blob in memory at a time.

Keys are relative POSIX paths made by shlhost (``links/<link>/<file>-<n>.jwe``), never
taken from user input. Failures of a backend other than "no such key" are ``OSError``s
(``BlobStoreError``), so callers can treat every backend alike.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from sqlalchemy import Engine

_KEY = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")


def check_key(key: str) -> str:
    if not _KEY.fullmatch(key) or {".", ".."} & set(key.split("/")):
        raise ValueError(f"invalid blob key {key!r}")
    return key


class BlobStore(Protocol):
    def put(self, key: str, data: bytes) -> None: ...

    def writer(self, key: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        """A binary file to write the blob into: committed whole (replacing any blob of that
        key) when the ``with`` block ends normally, dropped if it raises."""
        ...

    def get(self, key: str) -> bytes: ...

    def open(self, key: str) -> IO[bytes]:
        """The blob as a binary stream to read (the caller closes it); ``KeyError`` if none."""
        ...

    def delete(self, key: str) -> None: ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> Iterator[tuple[str, datetime]]:
        """Every key under ``prefix`` with its last-modified time (for ``shlhost gc``)."""
        ...

    def ping(self) -> None:
        """Raise if the store cannot be reached (for ``/readyz``)."""
        ...


class LocalBlobStore:
    """Files under one directory; written to a temporary file, fsynced, then renamed."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    @contextlib.contextmanager
    def writer(self, key: str) -> Iterator[IO[bytes]]:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def put(self, key: str, data: bytes) -> None:
        with self.writer(key) as fh:
            fh.write(data)

    def open(self, key: str) -> IO[bytes]:
        try:
            return self._path(key).open("rb")
        except FileNotFoundError:
            raise KeyError(key) from None

    def get(self, key: str) -> bytes:
        with self.open(key) as fh:
            return fh.read()

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> Iterator[tuple[str, datetime]]:
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                full = Path(dirpath) / name
                key = full.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    yield key, datetime.fromtimestamp(full.stat().st_mtime, UTC)

    def ping(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise OSError(f"blob directory {self.root} is not writable")


class BlobStoreError(OSError):
    """The blob store failed (unreachable, refused, misconfigured): not a missing key."""


class DatabaseBlobStore:
    """Rows of the ``blobs`` table. Every call runs in its own connection and transaction,
    so a blob is committed whole (or not at all) before ``put`` returns, whatever the
    caller's session does afterwards.

    On SQLite (one writer at a time) the caller must not hold a write transaction of its
    own while it calls ``put`` or ``delete``: that would wait on itself.
    """

    PAGE = 1000

    def __init__(self, engine: Engine) -> None:
        from sqlalchemy import Table

        from shlhost.storage.models import Blob

        self.engine = engine
        table = Blob.__table__
        assert isinstance(table, Table)
        self.table: Table = table

    def _run(self, work: Any) -> Any:
        from sqlalchemy.exc import SQLAlchemyError

        try:
            with self.engine.begin() as conn:
                return work(conn)
        except SQLAlchemyError as exc:
            raise BlobStoreError(f"database blob store: {type(exc).__name__}") from exc

    def put(self, key: str, data: bytes) -> None:
        from sqlalchemy import delete, insert

        check_key(key)
        row = {"key": key, "data": bytes(data), "created_at": datetime.now(UTC)}
        table = self.table
        dialect = self.engine.dialect.name

        def work(conn: Any) -> None:
            if dialect in ("postgresql", "sqlite"):
                from sqlalchemy.dialects import postgresql, sqlite

                module: Any = postgresql if dialect == "postgresql" else sqlite
                stmt = module.insert(table).values(**row)
                conn.execute(stmt.on_conflict_do_update(
                    index_elements=[table.c.key],
                    set_={"data": stmt.excluded.data, "created_at": stmt.excluded.created_at},
                ))
            else:
                conn.execute(delete(table).where(table.c.key == key))
                conn.execute(insert(table).values(**row))

        self._run(work)

    @contextlib.contextmanager
    def writer(self, key: str) -> Iterator[IO[bytes]]:
        """Collects the blob in memory, then writes it in one transaction."""
        check_key(key)
        buffer = io.BytesIO()
        yield buffer
        self.put(key, buffer.getbuffer())

    def open(self, key: str) -> IO[bytes]:
        return io.BytesIO(self.get(key))

    def get(self, key: str) -> bytes:
        from sqlalchemy import select

        check_key(key)
        table = self.table
        query = select(table.c.data).where(table.c.key == key)
        data = self._run(lambda conn: conn.execute(query).scalar())
        if data is None:
            raise KeyError(key)
        return bytes(data)

    def delete(self, key: str) -> None:
        from sqlalchemy import delete

        check_key(key)
        table = self.table
        self._run(lambda conn: conn.execute(delete(table).where(table.c.key == key)))

    def exists(self, key: str) -> bool:
        from sqlalchemy import select

        check_key(key)
        table = self.table
        query = select(table.c.key).where(table.c.key == key)
        found = self._run(lambda conn: conn.execute(query).first())
        return found is not None

    def list(self, prefix: str = "") -> Iterator[tuple[str, datetime]]:
        """Keyset pages of ``PAGE`` keys, each read in its own short transaction, so that
        the caller may delete what it is given between pages."""
        from sqlalchemy import select

        from shlhost.storage.models import Blob

        after = ""
        while True:
            query = (
                select(Blob.key, Blob.created_at)
                .where(Blob.key.startswith(prefix, autoescape=True), Blob.key > after)
                .order_by(Blob.key)
                .limit(self.PAGE)
            )
            rows = self._run(lambda conn, q=query: conn.execute(q).all())
            yield from ((key, created) for key, created in rows)
            if len(rows) < self.PAGE:
                return
            after = rows[-1][0]

    def ping(self) -> None:
        from sqlalchemy import select

        table = self.table
        self._run(lambda conn: conn.execute(select(table.c.key).limit(1)).all())


class S3BlobStore:
    """Objects in one S3 bucket (AWS or any S3-compatible endpoint), under ``prefix``.

    ``put_object`` is atomic: an object is visible whole or not at all. Credentials come
    from boto3's usual chain (environment, ``~/.aws``, instance role).
    """

    SPOOL = 8 * 1024 * 1024

    def __init__(self, bucket: str, *, prefix: str = "", endpoint_url: str | None = None,
                 region: str | None = None) -> None:
        import boto3
        from botocore.config import Config

        if not bucket:
            raise ValueError("S3BlobStore needs a bucket")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        session = boto3.session.Session()
        common = {"endpoint_url": endpoint_url or None, "region_name": region or None}
        self.client = session.client("s3", config=Config(
            connect_timeout=5, read_timeout=60, max_pool_connections=32,
            retries={"max_attempts": 4, "mode": "standard"},
        ), **common)
        # Readiness must answer quickly: one attempt, short timeouts.
        self._probe = session.client("s3", config=Config(
            connect_timeout=2, read_timeout=5, retries={"total_max_attempts": 1},
        ), **common)

    def _name(self, key: str) -> str:
        return self.prefix + check_key(key)

    @staticmethod
    def _not_found(exc: Exception) -> bool:
        from botocore.exceptions import ClientError

        if not isinstance(exc, ClientError):
            return False
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return error.get("Code") in ("NoSuchKey", "404", "NotFound") or status == 404

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (BotoCoreError, ClientError) as exc:
            raise BlobStoreError(f"S3 {what} on bucket {self.bucket}: {exc}") from exc

    def put(self, key: str, data: bytes) -> None:
        name = self._name(key)
        with self._errors("put"):
            self.client.put_object(Bucket=self.bucket, Key=name, Body=bytes(data))

    @contextlib.contextmanager
    def writer(self, key: str) -> Iterator[IO[bytes]]:
        """Spools to a temporary file (in memory up to ``SPOOL`` bytes), then uploads it;
        boto3 turns a large one into a multipart upload, which becomes visible only whole."""
        name = self._name(key)
        with tempfile.SpooledTemporaryFile(max_size=self.SPOOL) as spool:
            yield spool
            spool.seek(0)
            with self._errors("put"):
                self.client.upload_fileobj(spool, self.bucket, name)

    def open(self, key: str) -> IO[bytes]:
        name = self._name(key)
        with self._errors("get"):
            try:
                answer = self.client.get_object(Bucket=self.bucket, Key=name)
            except Exception as exc:
                if self._not_found(exc):
                    raise KeyError(key) from None
                raise
            body: IO[bytes] = answer["Body"]
            return body

    def get(self, key: str) -> bytes:
        with self.open(key) as body, self._errors("get"):
            return body.read()

    def delete(self, key: str) -> None:
        name = self._name(key)
        with self._errors("delete"):
            self.client.delete_object(Bucket=self.bucket, Key=name)

    def exists(self, key: str) -> bool:
        name = self._name(key)
        with self._errors("head"):
            try:
                self.client.head_object(Bucket=self.bucket, Key=name)
            except Exception as exc:
                if self._not_found(exc):
                    return False
                raise
            return True

    def list(self, prefix: str = "") -> Iterator[tuple[str, datetime]]:
        paginator = self.client.get_paginator("list_objects_v2")
        with self._errors("list"):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for item in page.get("Contents", []):
                    key = item["Key"][len(self.prefix):]
                    if not _KEY.fullmatch(key) or {".", ".."} & set(key.split("/")):
                        continue  # not written by shlhost: never touched
                    yield key, item["LastModified"].astimezone(UTC)

    def ping(self) -> None:
        with self._errors("head_bucket"):
            self._probe.head_bucket(Bucket=self.bucket)


class CachingBlobStore:
    """Any store, with its small blobs kept in memory (least recently used first out).

    shlhost never rewrites a blob in place: a new version of a file is written under a new
    key and the row is pointed at it, a revoked file's row forgets its key. So a cached blob
    cannot go stale, even when another server deletes it; ``put``, ``writer`` and ``delete``
    through this store drop the key all the same. Only ``get`` fills the cache (the
    manifest's embedded files); ``open`` serves a cached blob from memory and streams the
    rest.
    """

    def __init__(self, inner: BlobStore, max_bytes: int, max_item: int = 256 * 1024) -> None:
        self.inner = inner
        self.max_bytes = max_bytes
        self.max_item = min(max_item, max_bytes)
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def _cached(self, key: str) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def _remember(self, key: str, data: bytes) -> None:
        if len(data) > self.max_item:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = data
            self._size += len(data)
            while self._size > self.max_bytes:
                _old, dropped = self._items.popitem(last=False)
                self._size -= len(dropped)

    def _forget(self, key: str) -> None:
        with self._lock:
            dropped = self._items.pop(key, None)
            if dropped is not None:
                self._size -= len(dropped)

    def get(self, key: str) -> bytes:
        data = self._cached(key)
        if data is None:
            data = self.inner.get(key)
            self._remember(key, data)
        return data

    def open(self, key: str) -> IO[bytes]:
        data = self._cached(key)
        return io.BytesIO(data) if data is not None else self.inner.open(key)

    def put(self, key: str, data: bytes) -> None:
        self._forget(key)
        self.inner.put(key, data)

    @contextlib.contextmanager
    def writer(self, key: str) -> Iterator[IO[bytes]]:
        self._forget(key)
        with self.inner.writer(key) as out:
            yield out

    def delete(self, key: str) -> None:
        self._forget(key)
        self.inner.delete(key)

    def exists(self, key: str) -> bool:
        return self._cached(key) is not None or self.inner.exists(key)

    def list(self, prefix: str = "") -> Iterator[tuple[str, datetime]]:
        return self.inner.list(prefix)

    def ping(self) -> None:
        self.inner.ping()


BACKENDS = ("local", "database", "s3")


def make_blob_store(config: dict[str, Any], engine: Engine | None = None) -> BlobStore:
    """The store ``BLOB_BACKEND`` names, with ``BLOB_CACHE_BYTES`` of small blobs kept in
    memory (0: none). ``database`` writes through ``engine``."""
    store = _backend(config, engine)
    cache = int(config.get("BLOB_CACHE_BYTES") or 0)
    return CachingBlobStore(store, cache) if cache > 0 else store


def _backend(config: dict[str, Any], engine: Engine | None) -> BlobStore:
    backend = config["BLOB_BACKEND"]
    if backend == "local":
        return LocalBlobStore(config["BLOB_PATH"])
    if backend == "database":
        if engine is None:
            raise ValueError("the database blob store needs the engine")
        return DatabaseBlobStore(engine)
    if backend == "s3":
        return S3BlobStore(
            str(config["S3_BUCKET"]),
            prefix=str(config.get("S3_PREFIX") or ""),
            endpoint_url=config.get("S3_ENDPOINT_URL") or None,
            region=config.get("S3_REGION") or None,
        )
    raise ValueError(f"unknown blob backend {backend!r}")
