"""Engine and session factory. The session's lifecycle belongs to the caller (request, CLI)."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.orm import Session, sessionmaker


def normalise_url(url: str) -> str:
    """Accept ``postgresql://`` and ``postgres://`` and use psycopg 3 for them."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return url


def make_engine(url: str, **kwargs: Any) -> Engine:
    url = normalise_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(parsed.database)), exist_ok=True)
        connect_args: dict[str, Any] = {"timeout": 30}
        if parsed.database and parsed.database != ":memory:" and not parsed.query.get("uri"):
            connect_args["factory"] = WriterLockedConnection
        engine = create_engine(url, connect_args=connect_args, **kwargs)
        _sqlite_serialised_writes(engine)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 10)
    return create_engine(url, **kwargs)


# Transactions holding the writer lock, by thread: a thread that begins a second one
# while it holds the lock must not wait for itself (see WriterLockedConnection).
_held_by_thread: dict[int, int] = {}
_held_guard = threading.Lock()


class WriterLockedConnection(sqlite3.Connection):
    """A SQLite connection that queues its transactions on an OS lock, not in SQLite.

    Every transaction begins with ``BEGIN IMMEDIATE`` (see ``_sqlite_serialised_writes``),
    so SQLite runs them one at a time. A transaction that finds the database locked waits
    in SQLite's busy handler, which *sleeps* (1, 2, 5, 10 ms and longer) and checks again:
    under load most of the waiting is sleeping after the lock was already free. Here each
    transaction first takes an exclusive ``flock`` on ``<database>-lock`` (shared by every
    thread and process using the same file) and gives it back right after ``COMMIT`` or
    ``ROLLBACK``; the kernel wakes the next waiter at once.

    The ``flock`` only orders the waiting: SQLite's own lock still guarantees correctness,
    and a program that does not take the ``flock`` (the sqlite3 shell) simply meets the busy
    handler as before. The lock is given back on commit, rollback, close and garbage
    collection, and the kernel drops it if the process dies. A thread that begins a second
    transaction while its first still holds the lock skips the ``flock`` (it would wait for
    itself forever) and meets SQLite's busy timeout instead, as without this class. Unlike
    the busy timeout, the ``flock`` has no time limit: a transaction waits as long as the one
    before it lasts.
    """

    _lock_path: str | None = None
    _lock_fd: int | None = None
    _lock_thread: int | None = None  # the thread that took the lock, while it is held

    def use_lock_file(self, path: str) -> None:
        self._lock_path = path

    def begin_immediate(self) -> None:
        self._acquire()
        try:
            self.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._release()
            raise

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            if not self.in_transaction:
                self._release()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            if not self.in_transaction:
                self._release()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._release()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def __del__(self) -> None:
        # Never left unclosed by the pool, but a lock file descriptor must not outlive us.
        if self._lock_fd is not None:
            try:
                self._release()
                os.close(self._lock_fd)
            except Exception:  # noqa: BLE001, S110 - at interpreter exit modules may be gone
                pass
            self._lock_fd = None

    def _acquire(self) -> None:
        if self._lock_path is None or self._lock_thread is not None:
            return
        me = threading.get_ident()
        if me in _held_by_thread:
            return  # this thread's other transaction holds it: SQLite's busy timeout decides
        if self._lock_fd is None:
            try:
                flags = os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC
                self._lock_fd = os.open(self._lock_path, flags, 0o644)
            except OSError:
                self._lock_path = None  # no lock file here: SQLite's busy handler alone
                return
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self._lock_thread = me
        with _held_guard:
            _held_by_thread[me] = _held_by_thread.get(me, 0) + 1

    def _release(self) -> None:
        owner = self._lock_thread
        if owner is None or self._lock_fd is None:
            return
        self._lock_thread = None
        with _held_guard:
            left = _held_by_thread.get(owner, 1) - 1
            if left > 0:
                _held_by_thread[owner] = left
            else:
                _held_by_thread.pop(owner, None)
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)


def _sqlite_serialised_writes(engine: Engine) -> None:
    """WAL, foreign keys, and ``BEGIN IMMEDIATE`` (after the writer lock, for a file).

    SQLite allows one writer. A deferred transaction that reads first and writes later can
    fail at once with SQLITE_BUSY when another writer got in between; taking the write lock
    up front makes concurrent transactions queue (up to the busy timeout) instead.
    """
    database = engine.url.database or ""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()
        if isinstance(dbapi_conn, WriterLockedConnection):
            dbapi_conn.use_lock_file(os.path.abspath(database) + "-lock")

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        begin_dbapi(conn.dialect, conn.connection.driver_connection)


def begin_dbapi(dialect: Dialect, dbapi_conn: Any) -> None:
    """Begin a transaction on a DBAPI connection as the engine's ``begin`` does.

    SQLite: the writer lock, then ``BEGIN IMMEDIATE``. psycopg begins by itself at the
    first statement (its connections are not in autocommit mode).
    """
    if dialect.name != "sqlite":
        return
    if isinstance(dbapi_conn, WriterLockedConnection):
        dbapi_conn.begin_immediate()
    else:
        dbapi_conn.execute("BEGIN IMMEDIATE")


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"
