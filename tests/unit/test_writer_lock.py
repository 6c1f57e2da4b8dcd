"""The SQLite writer lock (shlhost.storage.db.WriterLockedConnection).

Every transaction on a SQLite file takes an exclusive ``flock`` on ``<database>-lock``
before ``BEGIN IMMEDIATE`` and gives it back after COMMIT or ROLLBACK, on every path. These
tests probe the lock from outside with a non-blocking ``flock`` of their own.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, Integer, column, text

from shlhost.storage.db import WriterLockedConnection, make_engine, make_sessionmaker
from shlhost.storage.rawsql import RawStatement, RawTransaction

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "shlhost.db"


@pytest.fixture
def engine(db_path: Path) -> Iterator[Engine]:
    eng = make_engine(f"sqlite:///{db_path}")
    with eng.begin() as conn:
        conn.execute(text("CREATE TABLE counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)"))
        conn.execute(text("INSERT INTO counter VALUES (1, 0)"))
    yield eng
    eng.dispose()


def lock_is_free(db_path: Path) -> bool:
    """True if nobody holds the writer lock right now (taken and given back at once)."""
    fd = os.open(f"{db_path}-lock", os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing drops a lock we took
    return True


def test_file_databases_use_the_locking_connection(engine: Engine) -> None:
    with engine.connect() as conn:
        assert isinstance(conn.connection.driver_connection, WriterLockedConnection)


def test_memory_databases_have_no_lock_file() -> None:
    eng = make_engine("sqlite://")
    with eng.begin() as conn:
        assert conn.execute(text("SELECT 1")).scalar() == 1
        assert not isinstance(conn.connection.driver_connection, WriterLockedConnection)
    eng.dispose()


def test_held_for_the_transaction_and_released_on_commit(engine: Engine, db_path: Path) -> None:
    with engine.connect() as conn:
        assert lock_is_free(db_path)
        conn.execute(text("UPDATE counter SET n = n + 1"))  # begins: takes the lock
        assert not lock_is_free(db_path)
        conn.commit()
        assert lock_is_free(db_path)


def test_released_on_rollback_and_on_an_exception(engine: Engine, db_path: Path) -> None:
    with engine.connect() as conn:
        conn.execute(text("UPDATE counter SET n = n + 1"))
        conn.rollback()
        assert lock_is_free(db_path)

    with pytest.raises(RuntimeError), engine.begin() as conn:
        conn.execute(text("UPDATE counter SET n = n + 1"))
        assert not lock_is_free(db_path)
        raise RuntimeError("boom")
    assert lock_is_free(db_path)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT n FROM counter")).scalar() == 0


def test_released_when_a_failed_statement_ends_the_session(engine: Engine, db_path: Path) -> None:
    sessions = make_sessionmaker(engine)
    with sessions() as session:
        with pytest.raises(Exception, match="no such table"):
            session.execute(text("UPDATE missing SET x = 1"))
        assert not lock_is_free(db_path)  # the transaction is still open until rollback
        session.rollback()
        assert lock_is_free(db_path)


def test_released_when_the_connection_is_closed_or_invalidated(
    engine: Engine, db_path: Path
) -> None:
    conn = engine.connect()
    conn.execute(text("UPDATE counter SET n = n + 1"))
    conn.close()  # returned to the pool: rolled back
    assert lock_is_free(db_path)

    conn = engine.connect()
    conn.execute(text("UPDATE counter SET n = n + 1"))
    conn.invalidate()  # the DBAPI connection is closed
    assert lock_is_free(db_path)
    conn.close()

    raw = engine.raw_connection()
    dbapi = raw.driver_connection
    assert isinstance(dbapi, WriterLockedConnection)
    dbapi.begin_immediate()
    assert not lock_is_free(db_path)
    dbapi.close()
    assert lock_is_free(db_path)
    raw.invalidate()


def test_raw_transactions_release_on_commit_rollback_and_close(
    engine: Engine, db_path: Path
) -> None:
    for end in ("commit", "rollback", "close"):
        tx = RawTransaction(engine)
        tx.dbapi_connection().execute("UPDATE counter SET n = n + 1")
        assert not lock_is_free(db_path)
        getattr(tx, end)()
        assert lock_is_free(db_path), end
    with pytest.raises(RuntimeError), RawTransaction(engine) as tx:
        tx.dbapi_connection().execute("UPDATE counter SET n = n + 1")
        raise RuntimeError("boom")
    assert lock_is_free(db_path)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT n FROM counter")).scalar() == 1  # the one commit


def test_raw_transactions_read_without_the_lock_until_their_first_write(
    engine: Engine, db_path: Path
) -> None:
    read = RawStatement(text("SELECT n FROM counter").columns(column("n", Integer)))
    write = RawStatement(text("UPDATE counter SET n = n + 1"))
    with RawTransaction(engine) as tx:
        assert read.first(tx, {}).n == 0
        assert lock_is_free(db_path)  # the read took no lock and left no transaction open
        write.run(tx, {})
        assert not lock_is_free(db_path)
        assert read.first(tx, {}).n == 1  # inside the transaction now
        tx.commit()
    assert lock_is_free(db_path)


def test_threads_queue_on_the_lock(engine: Engine, db_path: Path) -> None:
    sessions = make_sessionmaker(engine)
    holder = sessions()
    holder.execute(text("UPDATE counter SET n = n + 1"))  # holds the lock
    started, done = threading.Event(), threading.Event()

    def other() -> None:
        with sessions() as session:
            started.set()
            session.execute(text("UPDATE counter SET n = n + 10"))
            session.commit()
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    assert started.wait(10)
    assert not done.wait(0.2)  # waiting for the lock, not failing
    holder.commit()
    holder.close()
    thread.join(30)
    assert done.is_set()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT n FROM counter")).scalar() == 11
    assert lock_is_free(db_path)


def test_a_second_transaction_in_the_same_thread_does_not_wait_for_itself(
    engine: Engine, db_path: Path
) -> None:
    """It skips the lock and meets SQLite's busy timeout, as it would without the lock."""
    first = engine.connect()
    first.execute(text("UPDATE counter SET n = n + 1"))
    raw = engine.raw_connection()
    try:
        dbapi = raw.driver_connection
        assert isinstance(dbapi, WriterLockedConnection)
        dbapi.execute("PRAGMA busy_timeout=50")
        with pytest.raises(Exception, match="locked"):
            dbapi.begin_immediate()
        assert not dbapi.in_transaction
    finally:
        raw.close()
        first.rollback()
        first.close()
    assert lock_is_free(db_path)


CHILD = """
import sys
from sqlalchemy import text
from shlhost.storage.db import make_engine, make_sessionmaker
engine = make_engine(sys.argv[1])
sessions = make_sessionmaker(engine)
print("ready", flush=True)
sys.stdin.readline()
for _ in range(int(sys.argv[2])):
    with sessions() as session:
        n = session.execute(text("SELECT n FROM counter")).scalar()
        session.execute(text("UPDATE counter SET n = :n"), {"n": n + 1})
        session.commit()
"""


def test_processes_read_modify_write_without_lost_updates(engine: Engine, db_path: Path) -> None:
    """A read then a write in one transaction, from two processes: none overwrites another."""
    rounds = 200
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, f"sqlite:///{db_path}", str(rounds)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        for _ in range(2)
    ]
    for child in children:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    for child in children:  # both start together
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    for child in children:
        assert child.wait(120) == 0
        child.stdin.close()
        child.stdout.close()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT n FROM counter")).scalar() == 2 * rounds
    assert lock_is_free(db_path)
