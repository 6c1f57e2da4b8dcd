"""Group commit of uses (shlhost.shl.uses.UseRecorder), on the session's database (SQLite,
or PostgreSQL in CI's second run).

Batches are made deterministic by holding the database's writer up from outside: a
transaction that has written the link row (SQLite: the writer lock and the database's
RESERVED lock; PostgreSQL: the row lock). The first recorder thread then waits in its
UPDATE, the others queue behind it, and once the outside transaction ends, the queue is
written as one batch.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from shlhost.shl.uses import DEAD, OK, STALE, UseRecorder
from shlhost.storage.models import Access, Link

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def make_link(session: Session, **columns: Any) -> str:
    link_id = secrets.token_urlsafe(32)
    defaults = {"uses": 0, "active": True, "long_term": False, "direct": False}
    session.add(
        Link(
            id=link_id,
            management_token_hash="0" * 64,
            server_keyed=True,
            **{**defaults, **columns},
        )
    )
    session.commit()
    return link_id


# Each read ends its transaction: on SQLite an open one holds the writer lock.


def uses_of(session: Session, link_id: str) -> int:
    try:
        return int(session.scalar(select(Link.uses).where(Link.id == link_id)) or 0)
    finally:
        session.rollback()


def log_of(session: Session, link_id: str) -> list[tuple[str | None, str, str]]:
    try:
        rows = session.execute(
            select(Access.recipient, Access.action, Access.outcome)
            .where(Access.link_id == link_id)
            .order_by(Access.id)
        )
        return [tuple(r) for r in rows]  # type: ignore[misc]
    finally:
        session.rollback()


class Held:
    """An outside transaction that has written the link row, so every writer waits."""

    def __init__(self, engine: Engine, link_id: str) -> None:
        self.conn = engine.connect()
        self.conn.execute(
            update(Link.__table__).where(Link.__table__.c.id == link_id).values(label="held")
        )

    def release(self) -> None:
        self.conn.rollback()
        self.conn.close()


def wait_for(predicate: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.005)


@pytest.fixture
def recorder(engine: Engine) -> UseRecorder:
    return UseRecorder(engine)


def queued(recorder: UseRecorder) -> int:
    with recorder._lock:  # noqa: SLF001 - the test waits for the queue to fill
        return len(recorder._queue)  # noqa: SLF001


def record_in_threads(
    recorder: UseRecorder, engine: Engine, hold: str, uses: list[tuple[str, str]]
) -> list[Any]:
    """Record ``uses`` (link id, recipient) from one thread each while ``hold`` is held,
    so that the first writes alone and the rest queue; then let them go. Results in order."""
    held = Held(engine, hold)
    results: list[Any] = [None] * len(uses)
    threads = []
    try:
        for i, (link_id, recipient) in enumerate(uses):

            def run(i: int = i, link_id: str = link_id, recipient: str = recipient) -> None:
                try:
                    results[i] = recorder.record(link_id, NOW, recipient, "manifest")
                except Exception as exc:  # noqa: BLE001 - the test inspects it
                    results[i] = exc

            t = threading.Thread(target=run)
            t.start()
            threads.append(t)
            # The first becomes the writer (and waits for the held row); the rest queue.
            wait_for(lambda i=i: queued(recorder) == i)
    finally:
        held.release()
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    return results


def test_a_lone_use_is_written_at_once(session: Session, recorder: UseRecorder) -> None:
    link_id = make_link(session)
    assert recorder.record(link_id, NOW, "Dr Lone", "manifest") == OK
    assert uses_of(session, link_id) == 1
    assert log_of(session, link_id) == [("Dr Lone", "manifest", "ok")]
    assert (recorder.batches, recorder.written) == (1, 1)


def test_uses_that_arrive_together_share_one_transaction(
    session: Session, engine: Engine, recorder: UseRecorder
) -> None:
    link_id, other = make_link(session), make_link(session)
    uses = [(link_id, "first")] + [(link_id if i % 3 else other, f"r{i}") for i in range(1, 9)]
    results = record_in_threads(recorder, engine, link_id, uses)
    assert results == [OK] * 9
    # The first alone (it was writing while the others came), then the eight together.
    assert (recorder.batches, recorder.written) == (2, 9)
    assert uses_of(session, link_id) == 7
    assert uses_of(session, other) == 2
    assert [r for r, _a, _o in log_of(session, link_id)] == [
        "first", "r1", "r2", "r4", "r5", "r7", "r8"
    ]
    assert {o for _r, _a, o in log_of(session, other)} == {"ok"}


def test_a_batch_grants_exactly_the_uses_that_are_left(
    session: Session, engine: Engine, recorder: UseRecorder
) -> None:
    link_id = make_link(session, max_uses=4)
    results = record_in_threads(recorder, engine, link_id, [(link_id, f"r{i}") for i in range(7)])
    # r0 alone, then six in one batch: all six do not fit, so one at a time, in order.
    assert results == [OK, OK, OK, OK, DEAD, DEAD, DEAD]
    assert uses_of(session, link_id) == 4
    assert log_of(session, link_id) == [
        (f"r{i}", "manifest", "ok" if i < 4 else "dead") for i in range(7)
    ]


def test_a_link_that_died_since_it_was_read_is_logged_dead(
    session: Session, recorder: UseRecorder
) -> None:
    expired = make_link(session, exp=NOW - timedelta(seconds=1))
    paused = make_link(session, active=False)
    revoked = make_link(session, revoked_at=NOW - timedelta(days=1))
    locked = make_link(session, passcode_hash="x", attempts_left=0)
    for link_id in (expired, paused, revoked, locked):
        assert recorder.record(link_id, NOW, "late", "direct") == DEAD
        assert uses_of(session, link_id) == 0
        assert log_of(session, link_id) == [("late", "direct", "dead")]


def test_one_use_that_cannot_be_written_does_not_fail_its_batch(
    session: Session, engine: Engine, recorder: UseRecorder
) -> None:
    link_id = make_link(session)
    gone = secrets.token_urlsafe(32)  # no such link: its access row breaks the foreign key
    results = record_in_threads(
        recorder, engine, link_id, [(link_id, "a"), (link_id, "b"), (gone, "c"), (link_id, "d")]
    )
    assert results[:2] == [OK, OK] and results[3] == OK
    assert isinstance(results[2], Exception)
    assert uses_of(session, link_id) == 3
    assert [r for r, _a, _o in log_of(session, link_id)] == ["a", "b", "d"]
    assert log_of(session, gone) == []


def test_many_threads_count_every_use_once(
    session: Session, engine: Engine, recorder: UseRecorder
) -> None:
    link_id = make_link(session, max_uses=150)
    results: list[str] = []
    lock = threading.Lock()

    def hammer() -> None:
        for i in range(25):
            ok = recorder.record(link_id, NOW, f"t{threading.get_ident()}-{i}", "manifest")
            with lock:
                results.append(ok)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 200
    assert results.count(OK) == 150
    assert uses_of(session, link_id) == 150
    outcomes = [o for _r, _a, o in log_of(session, link_id)]
    assert outcomes.count("ok") == 150 and outcomes.count("dead") == 50
    assert recorder.written == 200


def version_of(session: Session, link_id: str) -> datetime:
    try:
        found = session.scalar(select(Link.updated_at).where(Link.id == link_id))
        assert found is not None
        return found
    finally:
        session.rollback()


def test_a_use_of_the_version_read_is_counted(session: Session, recorder: UseRecorder) -> None:
    link_id = make_link(session)
    seen = version_of(session, link_id)
    assert recorder.record(link_id, NOW, "Dr Same", "manifest", seen) == OK
    assert recorder.record(link_id, NOW, "Dr Same", "manifest", seen) == OK  # uses keep it
    assert uses_of(session, link_id) == 2
    assert version_of(session, link_id) == seen


def test_a_link_changed_since_it_was_read_writes_nothing(
    session: Session, recorder: UseRecorder
) -> None:
    link_id = make_link(session)
    seen = version_of(session, link_id)
    session.execute(
        update(Link)
        .where(Link.id == link_id)
        .values(label="new", updated_at=seen + timedelta(seconds=1))
    )
    session.commit()
    assert recorder.record(link_id, NOW, "Dr Stale", "manifest", seen) == STALE
    assert uses_of(session, link_id) == 0
    assert log_of(session, link_id) == []
    # A paused link that also changed is stale too: the request reads it again and finds
    # it paused, then logs that.
    session.execute(update(Link).where(Link.id == link_id).values(active=False))
    session.commit()
    assert recorder.record(link_id, NOW, "Dr Stale", "manifest", seen) == STALE
    # Of the version it now is, it is dead (and logged so).
    now_seen = version_of(session, link_id)
    assert recorder.record(link_id, NOW, "Dr Late", "manifest", now_seen) == DEAD
    assert log_of(session, link_id) == [("Dr Late", "manifest", "dead")]


def test_stale_and_current_uses_in_one_batch(
    session: Session, engine: Engine, recorder: UseRecorder
) -> None:
    link_id = make_link(session)
    current = version_of(session, link_id)
    old = current - timedelta(seconds=5)
    held = Held(engine, link_id)
    results: dict[str, str] = {}
    threads = []
    try:
        for name, version in (("first", current), ("old-1", old), ("new-1", current),
                              ("old-2", old), ("new-2", current)):
            t = threading.Thread(
                target=lambda n=name, v=version: results.__setitem__(
                    n, recorder.record(link_id, NOW, n, "manifest", v)
                )
            )
            t.start()
            threads.append(t)
            waiting = len(threads) - 1
            wait_for(lambda waiting=waiting: queued(recorder) == waiting)
    finally:
        held.release()
    for t in threads:
        t.join(30)
    assert results == {"first": OK, "old-1": STALE, "new-1": OK, "old-2": STALE, "new-2": OK}
    assert recorder.batches == 2
    assert uses_of(session, link_id) == 3
    assert [r for r, _a, _o in log_of(session, link_id)] == ["first", "new-1", "new-2"]


def test_batches_over_several_links_never_deadlock(engine: Engine, database_url: str) -> None:
    """Two processes' recorders (two engines), each batching uses of the same links in
    every order: rows are locked in one order, so no batch is ever aborted (PostgreSQL
    would abort one of two deadlocked transactions; the recorder would then split it)."""
    from shlhost.storage.db import make_engine, make_sessionmaker

    second = make_engine(database_url)
    recorders = [UseRecorder(engine), UseRecorder(second)]
    with make_sessionmaker(engine)() as session:
        links = [make_link(session) for _ in range(4)]
    failures: list[BaseException] = []

    def hammer(recorder: UseRecorder, offset: int) -> None:
        try:
            for i in range(80):
                link_id = links[(i * (offset + 1) + offset) % len(links)]
                assert recorder.record(link_id, NOW, f"r{offset}-{i}", "manifest") == OK
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    try:
        threads = [
            threading.Thread(target=hammer, args=(recorders[n % 2], n)) for n in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert failures == []
        assert sum(r.written for r in recorders) == 8 * 80
        assert [r.split for r in recorders] == [0, 0]
        with make_sessionmaker(engine)() as session:
            assert sum(uses_of(session, link_id) for link_id in links) == 8 * 80
    finally:
        second.dispose()
