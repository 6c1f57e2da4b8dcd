"""Counting a link's uses and logging them, with the requests that arrive together
committed together (group commit).

A manifest or a U-link request that is answered counts one use of its link and writes one
access-log row, and both are committed before the answer goes out: a record is never
served without its access being on the log, and ``max_uses`` is never exceeded. One
transaction per request made every request queue for the database's single writer (on
SQLite the writer lock, ``BEGIN IMMEDIATE``, ``COMMIT``; on PostgreSQL the link row's lock
and a durable commit), so under load requests mostly waited for each other.

A ``UseRecorder`` (one per process and engine) lets the threads of a process share that
wait: the first thread to arrive writes, in one transaction, every use that is queued when
it starts; the threads that arrive meanwhile wait, and the oldest of them writes the next
batch as soon as the current one is committed. Nobody waits for a timer, a lone request is
written at once, and each request still returns only after its own use is committed (or
raises the error that stopped its commit). If a batch fails, its uses are written again
one transaction each, so one use that cannot be written does not fail the others.

In a batch, the uses of one link are counted with one conditional ``UPDATE`` when all of
them fit (live link, ``uses + n <= max_uses``); otherwise one at a time, in arrival order,
so exactly the uses that are left are granted. All the access-log rows go in with one
``executemany``.

A request may name the version of the link it read (its ``updated_at``, which every change
of the link or its files moves): the use is then counted only if the link is still that
version, in the same ``UPDATE``, and otherwise nothing is written and the request learns it
must read the link again (``STALE``). That is what lets the manifest serve a link from
what this process read of it before (``shlhost.shl.links.LiveLinkCache``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, bindparam, insert, select, update

from shlhost.storage.models import Access, Link
from shlhost.storage.rawsql import RawStatement, RawTransaction

# The longest access-log field we keep for a recipient (the spec's recipient is free text).
RECIPIENT_MAX = 200
# Uses written by one transaction at most; the rest wait for the next one.
BATCH_MAX = 64

# What a request's use came to.
OK, DEAD, STALE = "ok", "dead", "stale"

_LINKS, _ACCESS = Link.__table__, Access.__table__
_ID, _NOW, _N = bindparam("link_id"), bindparam("now"), bindparam("n")
_VERSION = bindparam("version", type_=_LINKS.c.updated_at.type)


def _spend(n: int | None, versioned: bool) -> RawStatement:
    """Count one use (``n`` None) or ``n`` uses, only if all of them fit, of a live link;
    ``versioned``: only if the link is still the version the request read (``updated_at``
    changes with every change of the link or its files, never with a use or an attempt:
    those set it to itself, to keep its onupdate away)."""
    uses = 1 if n is None else _N
    conditions = [_LINKS.c.id == _ID, Link.live(_NOW, uses)]
    if versioned:
        conditions.append(_LINKS.c.updated_at == _VERSION)
    return RawStatement(
        update(_LINKS)
        .where(*conditions)
        .values(uses=_LINKS.c.uses + uses, updated_at=_LINKS.c.updated_at)
        .returning(_LINKS.c.uses)
    )


# [versioned][several]
_SPEND = ((_spend(None, False), _spend(1, False)), (_spend(None, True), _spend(1, True)))
SPEND_USE = _SPEND[0][0]
_CURRENT_VERSION = RawStatement(select(_LINKS.c.updated_at).where(_LINKS.c.id == _ID))
LOG_ACCESS = RawStatement(
    insert(_ACCESS).values(
        {
            column: bindparam(column.key, type_=column.type)
            for column in (
                _ACCESS.c.link_id,
                _ACCESS.c.at,
                _ACCESS.c.recipient,
                _ACCESS.c.action,
                _ACCESS.c.outcome,
                _ACCESS.c.file_id,
            )
        }
    )
)


def access_row(
    link_id: str,
    now: datetime,
    recipient: str | None,
    action: str,
    outcome: str,
    file_id: str | None = None,
) -> dict[str, Any]:
    """The parameters of ``LOG_ACCESS`` for one access."""
    return {
        "link_id": link_id,
        "at": now,
        "recipient": (recipient or None) and recipient[:RECIPIENT_MAX],
        "action": action,
        "outcome": outcome,
        "file_id": file_id,
    }


class BatchFailed(RuntimeError):
    """The thread writing this request's use was interrupted; nothing of it was written."""


_WAITING, _LEADING, _DONE = 0, 1, 2


def _lock_order(group: tuple[str, datetime | None]) -> tuple[str, bool, datetime | None]:
    link_id, version = group
    return (link_id, version is not None, version)


class _Use:
    __slots__ = (
        "link_id", "now", "recipient", "action", "version",
        "state", "outcome", "committed", "error", "wake",
    )

    def __init__(
        self,
        link_id: str,
        now: datetime,
        recipient: str | None,
        action: str,
        version: datetime | None,
    ) -> None:
        self.link_id = link_id
        self.now = now
        self.recipient = recipient
        self.action = action
        self.version = version
        self.state = _WAITING
        self.outcome = DEAD
        self.committed = False
        self.error: BaseException | None = None
        # Held while the use waits: the writer releases it once, when the use is done or
        # is to write the next batch (so each waiter is woken once, and only when needed).
        self.wake: threading.Lock | None = None


class UseRecorder:
    """Group commit of uses and their access-log rows, for one engine in one process."""

    def __init__(self, engine: Engine, batch_max: int = BATCH_MAX) -> None:
        self.engine = engine
        self.batch_max = batch_max
        self._lock = threading.Lock()  # guards the queue and the writing flag
        self._queue: list[_Use] = []
        self._writing = False  # a thread is writing a batch; the next one waits its turn
        # For tests and diagnostics: transactions and uses written so far.
        self.batches = 0
        self.written = 0
        self.split = 0  # batches that failed and were written one use at a time

    def record(
        self,
        link_id: str,
        now: datetime,
        recipient: str | None,
        action: str,
        version: datetime | None = None,
    ) -> str:
        """Count one use of a live link and log the access: ``OK``. ``DEAD`` if the link is
        no longer live (revoked, paused, expired, used up or locked out since it was read),
        logged as such. With ``version`` (the ``updated_at`` the request read): ``STALE``,
        with nothing counted or logged, if the link has changed since. Returns once the
        row is committed."""
        use = _Use(link_id, now, recipient, action, version)
        wake = None
        with self._lock:
            self._queue.append(use)
            if self._writing:
                wake = use.wake = threading.Lock()
                wake.acquire()
            else:
                self._writing = True
        if wake is not None:
            wake.acquire()  # until the writer releases it
            if use.state == _DONE:
                return self._result(use)
        with self._lock:  # this thread writes the next batch, its own use first
            batch = self._queue[: self.batch_max]
            del self._queue[: self.batch_max]
        try:
            self._write_batch(batch)
        except BaseException:  # not an error of the database: interrupted
            for each in batch:
                if each is not use and each.error is None and not each.committed:
                    each.error = BatchFailed("the transaction carrying this use was interrupted")
            raise
        finally:
            with self._lock:
                for each in batch:
                    each.state = _DONE
                leader = self._queue[0] if self._queue else None
                if leader is not None:
                    leader.state = _LEADING  # the oldest waiter writes the next batch
                else:
                    self._writing = False
            for each in batch:
                if each.wake is not None and each is not use:
                    each.wake.release()
            if leader is not None and leader.wake is not None:  # every queued use waits
                leader.wake.release()
        return self._result(use)

    @staticmethod
    def _result(use: _Use) -> str:
        if use.error is not None:
            raise use.error  # this use's own error: each is raised in one thread only
        return use.outcome

    @staticmethod
    def _spend_group(
        tx: RawTransaction, link_id: str, version: datetime | None, uses: list[_Use]
    ) -> None:
        """The outcome of each of ``uses``: all at once if they all fit, else in order."""
        one, several = _SPEND[version is not None]
        params: dict[str, Any] = {"link_id": link_id, "version": version}
        if len(uses) > 1:
            params.update(now=max(u.now for u in uses), n=len(uses))
            if several.first(tx, params) is not None:
                for use in uses:
                    use.outcome = OK
                return
        for use in uses:
            params["now"] = use.now
            use.outcome = OK if one.first(tx, params) is not None else DEAD
        if version is not None and uses[-1].outcome == DEAD:
            current = _CURRENT_VERSION.first(tx, {"link_id": link_id})
            if current is not None and current.updated_at != version:
                for use in uses:  # none was counted: the version test failed for each
                    use.outcome = STALE

    def _write_batch(self, batch: Sequence[_Use]) -> None:
        """Write the batch, or if that fails, each use alone: one use that cannot be
        written (its link deleted meanwhile, say) must not fail the others."""
        try:
            self._write(batch)
            return
        except Exception as exc:
            if len(batch) == 1:
                batch[0].error = exc
                return
        self.split += 1
        for use in batch:
            try:
                self._write([use])
            except Exception as exc:
                use.error = exc

    def _write(self, batch: Sequence[_Use]) -> None:
        with RawTransaction(self.engine) as tx:
            groups: dict[tuple[str, datetime | None], list[_Use]] = {}
            for use in batch:
                groups.setdefault((use.link_id, use.version), []).append(use)
            # Links in one order in every transaction of every process: two batches that
            # lock the same rows in opposite orders would deadlock (PostgreSQL ends one
            # after deadlock_timeout, a second).
            for link_id, version in sorted(groups, key=_lock_order):
                self._spend_group(tx, link_id, version, groups[link_id, version])
            LOG_ACCESS.run_many(
                tx,
                [
                    access_row(u.link_id, u.now, u.recipient, u.action, u.outcome)
                    for u in batch
                    if u.outcome != STALE
                ],
            )
            tx.commit()
        for use in batch:
            use.committed = True
        self.batches += 1
        self.written += len(batch)
