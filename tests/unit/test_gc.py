"""``shlhost gc``: retention of expired and revoked links, and orphaned blobs, on every blob
backend, with a session and a store and no Flask (the CLI at the end)."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from shlhost import gc
from shlhost.cli import cli
from shlhost.crypto.passcodes import hasher
from shlhost.errors import DeadLink
from shlhost.phr.formats import prepare_json
from shlhost.shl.links import LinkOptions, LinkService, LinkSettings
from shlhost.storage.blobs import BlobStore, DatabaseBlobStore, LocalBlobStore, S3BlobStore
from shlhost.storage.db import make_sessionmaker
from shlhost.storage.models import Access, Link, LinkFile
from tests.conftest import S3Server
from tests.helpers import minimal_bundle

DAY = timedelta(days=1)
SETTINGS = gc.GcSettings(retention=timedelta(days=30), grace=timedelta(hours=1))


@pytest.fixture(params=["local", "database", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path, engine: Any) -> BlobStore:
    if request.param == "local":
        return LocalBlobStore(tmp_path / "blobs")
    if request.param == "database":
        return DatabaseBlobStore(engine)
    s3: S3Server = request.getfixturevalue("s3_server")
    return S3BlobStore(s3.new_bucket(), prefix="gc", endpoint_url=s3.endpoint, region="us-east-1")


@pytest.fixture
def service(session: Session, store: BlobStore) -> LinkService:
    settings = LinkSettings(
        kek=os.urandom(32),
        ticket_secret=b"t" * 32,
        public_url="http://localhost",
        ticket_lifetime=300,
        passcode_attempts=5,
        hasher=hasher("cheapest"),
    )
    return LinkService(session, store, settings)


class Made:
    """A link's id, kept as a plain string: on SQLite every read takes the write lock, so
    the tests must not touch expired ORM objects (that would refresh them) while a blob
    store writes through its own connection."""

    def __init__(self, link_id: str) -> None:
        self.id = link_id


def _link(
    service: LinkService, *, now: datetime, exp: datetime | None = None, files: int = 1
) -> Made:
    prepared = [prepare_json("application/fhir+json", minimal_bundle()) for _ in range(files)]
    link_id = service.create(prepared, LinkOptions(exp=exp, flags="L"), now=now).link.id
    service.manifest(link_id, recipient="Dr Before", passcode=None, embedded_max=None, now=now)
    return Made(link_id)


def _keys(session: Session, link_id: str) -> list[str | None]:
    keys = list(session.scalars(select(LinkFile.blob_key).where(LinkFile.link_id == link_id)))
    session.rollback()
    return keys


def _row(session: Session, link_id: str) -> Link:
    session.expire_all()
    link = session.get(Link, link_id)
    assert link is not None
    session.rollback()
    return link


# --- retention ----------------------------------------------------------------------------------


def test_links_retired_beyond_retention_are_purged(
    service: LinkService, session: Session, store: BlobStore
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    old_expired = _link(service, now=now - 40 * DAY, exp=now - 31 * DAY, files=2)
    recent_expired = _link(service, now=now - 40 * DAY, exp=now - 29 * DAY)
    alive = _link(service, now=now - 40 * DAY)
    future = _link(service, now=now, exp=now + DAY)
    # Revoked 40 days ago by something that did not purge (a failed delete, an old release).
    old_revoked = _link(service, now=now - 50 * DAY)
    session.execute(
        update(Link)
        .where(Link.id == old_revoked.id)
        .values(revoked_at=now - 40 * DAY, active=False)
    )
    session.commit()
    doomed = [k for k in _keys(session, old_expired.id) + _keys(session, old_revoked.id) if k]
    kept = [k for link in (recent_expired, alive, future) for k in _keys(session, link.id) if k]
    assert len(doomed) == 3 and all(store.exists(k) for k in doomed + kept)

    report = gc.run(session, store, SETTINGS, now=now)

    purged = {p.link_id: p for p in report.purged}
    assert report.errors == []
    assert set(purged) >= {old_expired.id, old_revoked.id}
    assert not set(purged) & {recent_expired.id, alive.id, future.id}
    assert (purged[old_expired.id].reason, purged[old_expired.id].since) == (
        "expired",
        now - 31 * DAY,
    )
    assert (purged[old_revoked.id].reason, purged[old_revoked.id].since) == (
        "revoked",
        now - 40 * DAY,
    )
    assert sorted(purged[old_expired.id].blobs + purged[old_revoked.id].blobs) == sorted(doomed)
    assert not any(store.exists(k) for k in doomed)
    assert all(store.exists(k) for k in kept)

    for link_id, revoked_at in ((old_expired.id, now), (old_revoked.id, now - 40 * DAY)):
        row = _row(session, link_id)  # the tombstone stays
        assert (
            row.wrapped_key is None
            and row.revoked_at == revoked_at
            and row.status(now) == "revoked"
        )
        assert _keys(session, link_id) and not any(_keys(session, link_id))
        logged = session.scalar(
            select(func.count()).select_from(Access).where(Access.link_id == link_id)
        )
        session.rollback()
        assert logged == 1  # the access log stays
    assert _row(session, recent_expired.id).wrapped_key is not None
    with pytest.raises(DeadLink):  # nothing can bring a purged link back
        service.manifest(
            old_expired.id, recipient="x", passcode=None, embedded_max=None, now=now - 35 * DAY
        )

    again = gc.run(session, store, SETTINGS, now=now)
    assert not {p.link_id for p in again.purged} & {old_expired.id, old_revoked.id}


def test_dry_run_changes_nothing(service: LinkService, session: Session, store: BlobStore) -> None:
    now = datetime.now(UTC)
    link = _link(service, now=now - 40 * DAY, exp=now - 35 * DAY)
    keys = _keys(session, link.id)

    report = gc.run(session, store, SETTINGS, now=now, dry_run=True)

    assert link.id in {p.link_id for p in report.purged}
    assert _keys(session, link.id) == keys and all(store.exists(k) for k in keys if k)
    assert _row(session, link.id).wrapped_key is not None
    assert any(line.startswith(f"would purge link {link.id} (expired") for line in report.lines())
    assert gc.run(session, store, SETTINGS, now=now).purged  # the real run still finds it


def test_retention_zero_purges_as_soon_as_expired(
    service: LinkService, session: Session, store: BlobStore
) -> None:
    now = datetime.now(UTC)
    link = _link(service, now=now - DAY, exp=now - timedelta(seconds=1))
    report = gc.run(
        session, store, gc.GcSettings(retention=timedelta(0), grace=SETTINGS.grace), now=now
    )
    assert link.id in {p.link_id for p in report.purged}


def test_the_update_rechecks_retirement(
    service: LinkService, session: Session, store: BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An owner who moves ``exp`` forward between gc's look and its update keeps the link."""
    now = datetime.now(UTC)
    link = _link(service, now=now - 40 * DAY, exp=now - 35 * DAY)
    keys = _keys(session, link.id)
    real_rollback = Session.rollback

    def rollback_then_owner_extends(self: Session) -> None:
        real_rollback(self)
        with make_sessionmaker(session.get_bind())() as other:
            other.execute(update(Link).where(Link.id == link.id).values(exp=now + DAY))
            other.commit()

    monkeypatch.setattr(Session, "rollback", rollback_then_owner_extends)
    report = gc.purge_retired(
        session, store, SETTINGS, now=now, dry_run=False, report=gc.Report(False)
    )
    monkeypatch.undo()
    assert report is None
    assert _row(session, link.id).wrapped_key is not None
    assert _keys(session, link.id) == keys and all(store.exists(k) for k in keys if k)


# --- orphans ----------------------------------------------------------------------------------


def test_orphans_old_enough_are_deleted(
    service: LinkService, session: Session, store: BlobStore
) -> None:
    now = datetime.now(UTC)
    link = _link(service, now=now, files=2)
    referenced = [k for k in _keys(session, link.id) if k]
    orphan = f"links/{link.id}/never-committed-{os.urandom(4).hex()}.jwe"
    store.put(orphan, b"ciphertext of an upload whose row never committed")
    foreign = f"other/{os.urandom(4).hex()}"
    store.put(foreign, b"not under a registered prefix")

    # Now: everything is inside the grace period (an upload may be in flight).
    young = gc.run(session, store, SETTINGS, now=now + timedelta(seconds=5))
    assert orphan not in young.orphans and store.exists(orphan)
    assert young.young >= 3

    later = now + SETTINGS.grace + timedelta(seconds=30)
    dry = gc.run(session, store, SETTINGS, now=later, dry_run=True)
    assert orphan in dry.orphans and store.exists(orphan)
    assert f"would delete orphaned blob {orphan}" in list(dry.lines())

    report = gc.run(session, store, SETTINGS, now=later)
    assert orphan in report.orphans
    assert not set(referenced) & set(report.orphans)
    assert not store.exists(orphan)
    assert all(store.exists(k) for k in referenced)
    assert store.exists(foreign)  # never touched: no owner claims other/
    manifest = service.manifest(
        link.id, recipient="Dr After", passcode=None, embedded_max=10**6, now=now
    )
    assert len(manifest["files"]) == 2


def test_a_failed_upload_leaves_an_orphan_that_gc_sweeps(
    service: LinkService, session: Session, store: BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The blob is written, then the transaction fails: exactly what the grace period is for."""
    now = datetime.now(UTC)
    before = {k for k, _ in store.list("links/")}
    monkeypatch.setattr(
        LinkService, "_delete_blobs", lambda self, keys: None
    )  # the clean-up fails too
    real_commit = Session.commit

    def commit_fails_with_the_link(self: Session) -> None:
        if any(isinstance(obj, Link) for obj in self.new):  # the blobs are already written
            raise OSError("database went away")
        real_commit(self)

    monkeypatch.setattr(Session, "commit", commit_fails_with_the_link)
    with pytest.raises(OSError):
        service.create(
            [prepare_json("application/fhir+json", minimal_bundle())], LinkOptions(), now=now
        )
    monkeypatch.undo()
    left = {k for k, _ in store.list("links/")} - before
    assert len(left) == 1
    report = gc.run(session, store, SETTINGS, now=now + SETTINGS.grace + timedelta(seconds=30))
    assert left <= set(report.orphans)
    assert not store.exists(left.pop())


def test_owners_are_a_list_of_prefixes(session: Session, store: BlobStore) -> None:
    now = datetime.now(UTC) + SETTINGS.grace + timedelta(seconds=30)
    tag = os.urandom(4).hex()
    store.put(f"records/{tag}/a", b"1")
    store.put(f"links/{tag}/b", b"2")
    owners = [gc.BlobOwner("records/", LinkFile.blob_key)]  # as a record store would register
    report = gc.run(session, store, SETTINGS, now=now, owners=owners)
    assert f"records/{tag}/a" in report.orphans and not store.exists(f"records/{tag}/a")
    assert store.exists(f"links/{tag}/b")  # links/ was not in this run's list
    store.delete(f"links/{tag}/b")


def test_register_refuses_a_second_owner_for_a_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gc, "BLOB_OWNERS", list(gc.BLOB_OWNERS))
    with pytest.raises(ValueError):
        gc.register(gc.BlobOwner("links/", LinkFile.blob_key))
    gc.register(gc.BlobOwner("attachments/", LinkFile.blob_key))
    assert [o.prefix for o in gc.BLOB_OWNERS] == ["links/", "attachments/"]


def test_crash_leftovers_of_the_local_store_are_swept(tmp_path: Path, session: Session) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    leftover = store.root / "links" / "x" / ".tmp-abc123"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half a blob")
    os.utime(leftover, (1_600_000_000, 1_600_000_000))
    report = gc.run(session, store, SETTINGS, now=datetime.now(UTC))
    assert report.orphans == ["links/x/.tmp-abc123"]
    assert not leftover.exists()


# --- the command ----------------------------------------------------------------------------------


def test_cli_gc(app: Flask, runner: Any) -> None:
    rt = app.extensions["shlhost"]
    now = datetime.now(UTC)
    with rt.sessions() as session:
        service = LinkService(session, rt.blobs, rt.links)
        link = _link(service, now=now - 50 * DAY, exp=now - 40 * DAY)
        keys = [k for k in _keys(session, link.id) if k]

    result = runner.invoke(cli, ["gc", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert f"would purge link {link.id} (expired" in result.output
    assert "dry run:" in result.output.splitlines()[-1]
    assert all(rt.blobs.exists(k) for k in keys)

    result = runner.invoke(cli, ["gc"])
    assert result.exit_code == 0, result.output
    assert f"purged link {link.id} (expired" in result.output
    assert not any(rt.blobs.exists(k) for k in keys)
    assert f"link {link.id}" not in runner.invoke(cli, ["gc"]).output


def test_cli_gc_honours_retention_days(base_config: dict[str, Any]) -> None:
    from tests.conftest import make_app

    app = make_app(base_config, RETENTION_DAYS=60)
    try:
        rt = app.extensions["shlhost"]
        now = datetime.now(UTC)
        with rt.sessions() as session:
            link = _link(
                LinkService(session, rt.blobs, rt.links), now=now - 50 * DAY, exp=now - 40 * DAY
            )
        output = app.test_cli_runner().invoke(cli, ["gc", "--dry-run"]).output
        assert link.id not in output
    finally:
        app.extensions["shlhost"].engine.dispose()
