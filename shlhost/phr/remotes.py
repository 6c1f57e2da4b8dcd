"""Pull: import what a SMART Health Link carries into an account's record, and remember
the link (a *remote*) so that later pulls take only what changed.

- The first pull of a link is a clone: every resource it carries is imported with the
  link's manifest URL as its source (never the key), and the import's Provenance names it.
- Later pulls skip files whose ``lastUpdated`` did not change; what changed goes through
  the Importer's merge rules, so unchanged resources make no new versions.
- A resource edited here (a version no import wrote) is never overwritten: if the remote
  still holds the content we had before the edit, nothing happens; if the remote changed
  it too, the disagreement is kept as a conflict.
- A remote is asked at most once per ``PULL_MIN_INTERVAL`` seconds (``force`` ignores it).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import tempfile
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import IO

import orjson
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shlhost.client import (
    FHIR_JSON,
    SPOOL,
    DecryptionFailed,
    Resolved,
    ShlClient,
    ShlError,
    ShlFile,
)
from shlhost.crypto.b64 import b64url_decode, b64url_encode
from shlhost.crypto.keys import unwrap_key, wrap_key
from shlhost.errors import BadRequest, ShlhostError
from shlhost.phr.importer import Importer, ImportOptions, ImportResult, Item, bundle_items
from shlhost.phr.store import NewVersion
from shlhost.shl.payload import Payload
from shlhost.storage.models import Remote, ResourceRow

CHUNK = 500


class TooSoon(ShlhostError):
    status = 429


@dataclass
class PullResult:
    url: str
    label: str | None
    result: ImportResult | None = None
    files: int = 0
    skipped_files: int = 0
    cards: list[str] = field(default_factory=list)  # verification of each health card
    api_access: int = 0
    error: str | None = None
    note: str | None = None  # not pulled, and not a failure (asked too recently)

    @property
    def counts(self) -> dict[str, int]:
        return self.result.counts if self.result else {}


def _context(account_id: int, url: str) -> str:
    return f"remote:{account_id}:{url}"


def remote_payload(remote: Remote, kek: bytes) -> Payload:
    key = unwrap_key(kek, remote.wrapped_key, _context(remote.account_id, remote.url))
    return Payload(
        url=remote.url, key=b64url_encode(key), flag=remote.flag or "", label=remote.label
    )


def remotes_of(session: Session, account_id: int) -> list[Remote]:
    return list(
        session.scalars(select(Remote).where(Remote.account_id == account_id).order_by(Remote.id))
    )


def pull(
    session: Session,
    account_id: int,
    link: str | Payload,
    *,
    kek: bytes,
    client: ShlClient,
    now: datetime,
    passcode: str | None = None,
    min_interval: float = 60,
    force: bool = False,
) -> PullResult:
    """Pull one link into the account's record; raises ``ShlError`` (what the remote said)
    or ``TooSoon``."""
    p = link if isinstance(link, Payload) else client.parse(link)
    remote = session.scalar(
        select(Remote).where(Remote.account_id == account_id, Remote.url == p.url)
    )
    if remote is not None and not force and remote.last_pulled is not None:
        due = remote.last_pulled + timedelta(seconds=min_interval)
        if now < due:
            wait = int((due - now).total_seconds()) + 1
            raise TooSoon(
                f"pulled less than {min_interval:g} s ago: try again in {wait} s",
                code="too_soon",
                retry_after=wait,
            )
    known: dict[str, str] | None = None
    if remote is not None and remote.last_file_updates:
        same_key = remote_payload(remote, kek).key == p.key
        known = json.loads(remote.last_file_updates) if same_key else None
    session.rollback()  # hold no transaction open while the remote answers
    with client.resolve(p, passcode, known_updates=known) as resolved:
        out = PullResult(url=p.url, label=p.label)
        out.files = len(resolved.files)
        out.skipped_files = sum(f.skipped for f in resolved.files)
        out.cards = [c.verification for f in resolved.files for c in f.cards]
        out.api_access = len(resolved.api_access)
        if any(_importable(f) for f in resolved.files):
            out.result = _import(session, account_id, p.url, resolved, now=now)
    # Remember the remote and what each file looked like.
    settled = resolved.settled_updates()
    if known:  # files skipped this time keep what we knew of them
        settled.update({str(f.index): known[str(f.index)] for f in resolved.files if f.skipped})
    for attempt in (1, 2):
        remote = session.scalar(
            select(Remote).where(Remote.account_id == account_id, Remote.url == p.url)
        )
        if remote is None:
            remote = Remote(account_id=account_id, url=p.url, created_at=now)
            session.add(remote)
        remote.wrapped_key = wrap_key(kek, b64url_decode(p.key), _context(account_id, p.url))
        remote.flag = p.flag
        remote.label = p.label
        remote.last_pulled = now
        remote.last_file_updates = json.dumps(settled)
        try:
            session.commit()
            break
        except IntegrityError:  # a parallel pull of the same link created it first
            session.rollback()
            if attempt == 2:
                raise
    return out


def pull_all(
    session: Session,
    account_id: int,
    *,
    kek: bytes,
    client: ShlClient,
    now: datetime,
    passcode: str | None = None,
    min_interval: float = 60,
    force: bool = False,
) -> list[PullResult]:
    """Pull every remote of the account; one failing remote does not stop the others."""
    results = []
    for remote in remotes_of(session, account_id):
        p = remote_payload(remote, kek)
        try:
            results.append(
                pull(
                    session,
                    account_id,
                    p,
                    kek=kek,
                    client=client,
                    now=now,
                    passcode=passcode,
                    min_interval=min_interval,
                    force=force,
                )
            )
        except TooSoon as exc:
            session.rollback()
            results.append(PullResult(url=p.url, label=p.label, note=exc.message))
        except (ShlError, ShlhostError) as exc:
            session.rollback()
            results.append(PullResult(url=p.url, label=p.label, error=exc.message))
    return results


def _importable(f: ShlFile) -> bool:
    if f.skipped:
        return False
    if f.content_type == FHIR_JSON:
        return f.plaintext is not None
    return any(card.bundle is not None for card in f.cards)


def _import(
    session: Session, account_id: int, url: str, resolved: Resolved, *, now: datetime
) -> ImportResult:
    options = ImportOptions(source=url, format="bundle", protect_local_edits=True)
    importer = Importer(session, account_id, options, now=now)
    with contextlib.closing(_items(resolved)) as items:  # its temporary files, even on errors
        fresh = _fresh(session, account_id, map(_without_source, items), importer.result)
        return importer.run(fresh)


def _items(resolved: Resolved) -> Generator[Item, None, None]:
    """Every resource the fetched files carry: a FHIR file is read from its plaintext by
    the importer's streaming ``bundle_items`` (never parsed whole), a health card's bundle
    from a temporary file of it."""
    for f in resolved.files:
        if not _importable(f):
            continue
        if f.content_type == FHIR_JSON:
            assert f.plaintext is not None
            yield from _file_items(f.index, f.plaintext)
            continue
        for card in f.cards:
            if card.bundle is not None:
                with tempfile.SpooledTemporaryFile(max_size=SPOOL) as fh:
                    fh.write(orjson.dumps(card.bundle))
                    yield from _file_items(f.index, fh)


def _file_items(index: int, fh: IO[bytes]) -> Iterator[Item]:
    try:
        for where, resource, problems in bundle_items(fh):
            yield f"file {index} {where}", resource, problems
    except BadRequest as exc:
        if exc.code != "invalid_json":
            raise
        raise DecryptionFailed(f"file {index} decrypts to something that is not JSON") from None


def _without_source(item: Item) -> Item:
    """The link is the source here (the sender's own ``meta.source`` is its business)."""
    where, resource, problems = item
    meta = resource.get("meta") if resource is not None else None
    if resource is None or not isinstance(meta, dict) or "source" not in meta:
        return item
    meta = {k: v for k, v in meta.items() if k != "source"}
    if meta:
        return where, {**resource, "meta": meta}, problems
    return where, {k: v for k, v in resource.items() if k != "meta"}, problems


def _fresh(
    session: Session, account_id: int, items: Iterator[Item], result: ImportResult
) -> Iterator[Item]:
    """``items`` without those the remote has not changed since a local edit here, looked
    up ``CHUNK`` at a time (a large file is never held whole)."""
    while batch := list(itertools.islice(items, CHUNK)):
        yield from _without(batch, _superseded(session, account_id, batch), result)


def _superseded(session: Session, account_id: int, items: list[Item]) -> set[tuple[str, str, str]]:
    """(type, id, hash) of incoming resources whose content is an OLD version here: the
    remote has not changed them since, and what is current here is a local change."""
    hashes: dict[str, list[tuple[str, str]]] = {}
    for _w, resource, _p in items:
        if resource is not None and isinstance(resource.get("id"), str):
            digest = NewVersion.of(resource, None).content_hash
            hashes.setdefault(digest, []).append((resource["resourceType"], resource["id"]))
    found: set[tuple[str, str, str]] = set()
    keys = list(hashes)
    for start in range(0, len(keys), CHUNK):
        rows = session.execute(
            select(
                ResourceRow.resource_type, ResourceRow.resource_id, ResourceRow.content_hash
            ).where(
                ResourceRow.account_id == account_id,
                ResourceRow.current.is_(False),
                ResourceRow.content_hash.in_(keys[start : start + CHUNK]),
            )
        )
        found.update((r.resource_type, r.resource_id, r.content_hash) for r in rows)
    if not found:
        return found
    # Only where the current version is a local edit: a remote that went back to an old
    # version of its own is a change like any other.
    local: set[tuple[str, str]] = set()
    ids = sorted({rid for _t, rid, _h in found})
    for start in range(0, len(ids), CHUNK):
        rows = session.execute(
            select(ResourceRow.resource_type, ResourceRow.resource_id).where(
                ResourceRow.account_id == account_id,
                ResourceRow.current.is_(True),
                ResourceRow.import_id.is_(None),
                ResourceRow.resource_id.in_(ids[start : start + CHUNK]),
            )
        )
        local.update((r.resource_type, r.resource_id) for r in rows)
    return {f for f in found if (f[0], f[1]) in local}


def _without(
    items: list[Item], seen: set[tuple[str, str, str]], result: ImportResult
) -> Iterator[Item]:
    for item in items:
        resource = item[1]
        if resource is not None and seen:
            digest = NewVersion.of(resource, None).content_hash
            if (resource["resourceType"], resource.get("id"), digest) in seen:
                result.counts["unchanged"] += 1
                continue
        yield item
