"""Retention and blob garbage collection (``shlhost gc``). No Flask: takes a session, the
blob store and settings.

Two sweeps:

1. **Retention.** A link that expired, or was revoked, more than ``retention`` ago loses its
   ciphertext and its wrapped key, exactly as revocation does; the row stays as a tombstone
   (its status becomes ``revoked``, so no later change of ``exp`` can bring back a link with
   nothing in it) and the access log stays.
2. **Orphans.** A blob under a registered prefix that no row references and that is older
   than ``grace`` is deleted: the leftovers of uploads whose transaction never committed,
   of deletes that failed, of crashes. The grace period protects uploads in flight (the
   blob is written before the row that names it is committed).

Which rows own which blobs is the list ``BLOB_OWNERS``: a key prefix and the column that
names keys under it. Other features register their own prefix with ``register``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import exists, or_, select, update
from sqlalchemy.orm import Session

from shlhost.storage.blobs import BlobStore
from shlhost.storage.models import Link, LinkFile

BATCH = 500


@dataclass(frozen=True)
class GcSettings:
    retention: timedelta
    grace: timedelta

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GcSettings:
        return cls(
            retention=timedelta(days=float(config["RETENTION_DAYS"])),
            grace=timedelta(seconds=float(config["BLOB_GRACE_SECONDS"])),
        )


@dataclass(frozen=True)
class BlobOwner:
    """Blobs whose key starts with ``prefix`` belong to the rows whose ``column`` names them.

    ``referenced(session, keys)`` answers which of ``keys`` are still named by a row.
    """

    prefix: str
    column: Any  # an ORM attribute such as LinkFile.blob_key

    def referenced(self, session: Session, keys: Sequence[str]) -> set[str]:
        return set(session.scalars(select(self.column).where(self.column.in_(keys))))


BLOB_OWNERS: list[BlobOwner] = [BlobOwner("links/", LinkFile.blob_key)]


def register(owner: BlobOwner) -> None:
    """Let ``shlhost gc`` sweep unreferenced blobs under ``owner.prefix`` too."""
    if any(existing.prefix == owner.prefix for existing in BLOB_OWNERS):
        raise ValueError(f"blob prefix {owner.prefix!r} already has an owner")
    BLOB_OWNERS.append(owner)


@dataclass
class Purged:
    link_id: str
    reason: str  # "expired" or "revoked"
    since: datetime
    blobs: list[str]
    revoked_at: datetime  # kept if the link was revoked; otherwise the time of the purge


@dataclass
class Report:
    dry_run: bool
    purged: list[Purged] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    young: int = 0  # blobs inside the grace period, left alone whatever they are
    errors: list[str] = field(default_factory=list)

    def lines(self) -> Iterator[str]:
        verb = "would purge" if self.dry_run else "purged"
        for item in self.purged:
            yield (
                f"{verb} link {item.link_id} ({item.reason} "
                f"{item.since.isoformat(timespec='seconds')}): "
                f"{len(item.blobs)} blob(s) and its key"
            )
        verb = "would delete" if self.dry_run else "deleted"
        for key in self.orphans:
            yield f"{verb} orphaned blob {key}"
        for error in self.errors:
            yield f"error: {error}"
        yield (
            f"{'dry run: ' if self.dry_run else ''}{len(self.purged)} link(s) purged, "
            f"{sum(len(p.blobs) for p in self.purged)} link blob(s) and {len(self.orphans)} "
            f"orphaned blob(s) deleted; {self.young} blob(s) younger than the grace period "
            "left alone"
        )


def _retired(now: datetime, retention: timedelta) -> Any:
    """SQL: the link expired or was revoked before ``now - retention``."""
    cutoff = now - retention
    return or_(Link.revoked_at < cutoff, Link.exp < cutoff)


def _still_holding() -> Any:
    """SQL: something is left to purge (a key, a blob, or the link is not yet a tombstone)."""
    return or_(
        Link.wrapped_key.is_not(None),
        Link.revoked_at.is_(None),
        exists().where(LinkFile.link_id == Link.id, LinkFile.blob_key.is_not(None)),
    )


def purge_retired(
    session: Session,
    blobs: BlobStore,
    settings: GcSettings,
    *,
    now: datetime,
    dry_run: bool,
    report: Report,
) -> None:
    cutoff = now - settings.retention
    after = ""
    while True:
        links = list(
            session.scalars(
                select(Link)
                .where(_retired(now, settings.retention), _still_holding(), Link.id > after)
                .order_by(Link.id)
                .limit(BATCH)
            )
        )
        if not links:
            session.rollback()
            return
        after = links[-1].id
        batch: list[Purged] = []
        for link in links:
            keys = list(
                session.scalars(
                    select(LinkFile.blob_key).where(
                        LinkFile.link_id == link.id, LinkFile.blob_key.is_not(None)
                    )
                )
            )
            revoked = link.revoked_at is not None and link.revoked_at < cutoff
            since = link.revoked_at if revoked else link.exp
            assert since is not None
            batch.append(
                Purged(
                    link.id,
                    "revoked" if revoked else "expired",
                    since,
                    [k for k in keys if k],
                    link.revoked_at or now,
                )
            )
        session.rollback()
        if dry_run:
            report.purged.extend(batch)
            continue
        for item in batch:
            # Re-checked in the UPDATE: an owner who just moved exp forward keeps the link.
            hit = session.execute(
                update(Link)
                .where(Link.id == item.link_id, _retired(now, settings.retention))
                .values(wrapped_key=None, active=False, updated_at=now, revoked_at=item.revoked_at)
                .returning(Link.id)
            ).scalar_one_or_none()
            if hit is None:
                session.rollback()
                continue
            session.execute(
                update(LinkFile).where(LinkFile.link_id == item.link_id).values(blob_key=None)
            )
            session.commit()
            report.purged.append(item)
            _delete(blobs, item.blobs, report)


def _delete(blobs: BlobStore, keys: Iterable[str], report: Report) -> None:
    for key in keys:
        try:
            blobs.delete(key)
        except OSError as exc:  # what is left is an orphan: the next run sweeps it
            report.errors.append(f"could not delete {key}: {exc}")


def _chunks(
    items: Iterator[tuple[str, datetime]], size: int
) -> Iterator[list[tuple[str, datetime]]]:
    chunk: list[tuple[str, datetime]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def sweep_orphans(
    session: Session,
    blobs: BlobStore,
    settings: GcSettings,
    *,
    now: datetime,
    dry_run: bool,
    report: Report,
    owners: Sequence[BlobOwner] | None = None,
) -> None:
    young = now - settings.grace
    for owner in BLOB_OWNERS if owners is None else owners:
        for chunk in _chunks(blobs.list(owner.prefix), BATCH):
            old = [key for key, when in chunk if when < young]
            report.young += len(chunk) - len(old)
            if not old:
                continue
            referenced = owner.referenced(session, old)
            session.rollback()  # no transaction stays open while blobs are deleted
            doomed = [key for key in old if key not in referenced]
            report.orphans.extend(doomed)
            if not dry_run:
                _delete(blobs, doomed, report)


def run(
    session: Session,
    blobs: BlobStore,
    settings: GcSettings,
    *,
    now: datetime,
    dry_run: bool = False,
    owners: Sequence[BlobOwner] | None = None,
) -> Report:
    """Purge retired links, then sweep orphaned blobs. Safe to run on several machines at
    once and to interrupt: every step is idempotent."""
    report = Report(dry_run=dry_run)
    try:
        purge_retired(session, blobs, settings, now=now, dry_run=dry_run, report=report)
        sweep_orphans(
            session, blobs, settings, now=now, dry_run=dry_run, report=report, owners=owners
        )
    finally:
        with contextlib.suppress(Exception):
            session.rollback()
    return report
