"""The versioned FHIR record store of one account: read, vread, history, search, update,
revert, and the conflicts that merges leave for the owner.

Every version is a row; ``current`` marks the one a read returns. Nothing is ever deleted:
a revert writes an old version's content back as a new version.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Select, bindparam, delete, func, insert, select, tuple_, update
from sqlalchemy.orm import Session

from shlhost.errors import BadRequest, Conflict, NotFound, PreconditionFailed
from shlhost.phr import fhir
from shlhost.storage.models import ResourceConflict, ResourceIdentifier, ResourceRow

SEARCH_MAX = 1000


def iso(when: datetime) -> str:
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def render(row: ResourceRow | Any) -> dict[str, Any]:
    """The resource as FHIR serves it: stored content plus server-set meta."""
    resource: dict[str, Any] = orjson.loads(row.content)
    meta = dict(resource.get("meta") or {})
    meta["versionId"] = str(row.version_id)
    meta["lastUpdated"] = iso(row.last_updated)
    if row.source:
        meta["source"] = row.source
    resource["meta"] = meta
    resource["id"] = row.resource_id
    return resource


def etag(row: ResourceRow) -> str:
    return f'W/"{row.version_id}"'


# Conflict ids are a 32-bit integer column (PostgreSQL's ``integer``).
CONFLICT_ID_MAX = 2**31 - 1


@dataclass
class NewVersion:
    """Everything needed to write one version; built the same way by every writer."""

    resource_type: str
    resource_id: str
    resource: dict[str, Any]
    content_hash: str
    source: str | None

    @classmethod
    def of(cls, resource: dict[str, Any], source: str | None) -> NewVersion:
        clean = fhir.strip_server_meta(resource)
        return cls(clean["resourceType"], clean["id"], clean, fhir.content_hash(clean), source)

    def row(
        self, account_id: int, version_id: int, now: datetime, import_id: int | None
    ) -> dict[str, Any]:
        return {
            "account_id": account_id,
            "resource_type": self.resource_type,
            "resource_id": self.resource_id,
            "version_id": version_id,
            "current": True,
            "last_updated": now,
            "content": orjson.dumps(self.resource).decode(),
            "content_hash": self.content_hash,
            "source": self.source[:500] if self.source else None,
            "import_id": import_id,
            "patient_id": fhir.patient_of(self.resource),
            "clinical_date": fhir.clinical_date(self.resource),
        }

    def identifier_rows(self, account_id: int) -> list[dict[str, Any]]:
        return [
            {
                "account_id": account_id,
                "resource_type": self.resource_type,
                "resource_id": self.resource_id,
                "system": system,
                "value": value,
            }
            for system, value in dict.fromkeys(fhir.identifiers(self.resource))
        ]


def write_versions(
    session: Session,
    account_id: int,
    items: Sequence[tuple[NewVersion, int]],
    *,
    now: datetime,
    import_id: int | None,
) -> None:
    """Write each (version, previous version number or 0) as the new current version.

    Callers decide; this only writes: the previous version stops being current, the new
    row is inserted, and the identifier index follows the new content.
    """
    if not items:
        return
    # The store keeps milliseconds, exactly what meta.lastUpdated shows and _since compares.
    now = now.replace(microsecond=now.microsecond // 1000 * 1000)
    replaced = [(v, prev) for v, prev in items if prev]
    if replaced:
        rows, idents = ResourceRow.__table__, ResourceIdentifier.__table__
        session.execute(
            update(rows)
            .where(
                rows.c.account_id == account_id,
                rows.c.resource_type == bindparam("t"),
                rows.c.resource_id == bindparam("i"),
                rows.c.version_id == bindparam("v"),
            )
            .values(current=False),
            [{"t": v.resource_type, "i": v.resource_id, "v": prev} for v, prev in replaced],
        )
        session.execute(
            delete(idents).where(
                idents.c.account_id == account_id,
                idents.c.resource_type == bindparam("t"),
                idents.c.resource_id == bindparam("i"),
            ),
            [{"t": v.resource_type, "i": v.resource_id} for v, _prev in replaced],
        )
    session.execute(
        insert(ResourceRow.__table__),
        [v.row(account_id, prev + 1, now, import_id) for v, prev in items],
    )
    identifier_rows = [r for v, _prev in items for r in v.identifier_rows(account_id)]
    if identifier_rows:
        session.execute(insert(ResourceIdentifier.__table__), identifier_rows)


class RecordStore:
    def __init__(self, session: Session, account_id: int) -> None:
        self.session = session
        self.account_id = account_id

    def _versions(self, rtype: str, rid: str) -> Select[tuple[ResourceRow]]:
        return select(ResourceRow).where(
            ResourceRow.account_id == self.account_id,
            ResourceRow.resource_type == rtype,
            ResourceRow.resource_id == rid,
        )

    def current(self, rtype: str, rid: str) -> ResourceRow | None:
        return self.session.scalars(
            self._versions(rtype, rid).where(ResourceRow.current.is_(True))
        ).first()

    def read(self, rtype: str, rid: str) -> ResourceRow:
        row = self.current(rtype, rid)
        if row is None:
            raise NotFound(f"{rtype}/{rid} is not in this record", code="not_found")
        return row

    def vread(self, rtype: str, rid: str, vid: str) -> ResourceRow:
        # ASCII digits only ("³".isdigit() is true), and within any database's integer.
        if not (vid.isascii() and vid.isdigit()) or len(vid) > 18:
            raise NotFound(f"{rtype}/{rid} has no version {vid}")
        row = self.session.scalars(
            self._versions(rtype, rid).where(ResourceRow.version_id == int(vid))
        ).first()
        if row is None:
            raise NotFound(f"{rtype}/{rid} has no version {vid}")
        return row

    def history(self, rtype: str, rid: str) -> list[ResourceRow]:
        rows = list(
            self.session.scalars(self._versions(rtype, rid).order_by(ResourceRow.version_id.desc()))
        )
        if not rows:
            raise NotFound(f"{rtype}/{rid} is not in this record")
        return rows

    def history_type(
        self, rtype: str, *, since: datetime | None = None, count: int = 100
    ) -> list[ResourceRow]:
        query = select(ResourceRow).where(
            ResourceRow.account_id == self.account_id, ResourceRow.resource_type == rtype
        )
        if since is not None:
            query = query.where(ResourceRow.last_updated > since)
        query = query.order_by(
            ResourceRow.last_updated.desc(), ResourceRow.resource_id, ResourceRow.version_id.desc()
        )
        return list(self.session.scalars(query.limit(min(count, SEARCH_MAX))))

    def search(
        self, rtype: str, *, patient: str | None = None, count: int = 100, offset: int = 0
    ) -> tuple[list[ResourceRow], int]:
        query = select(ResourceRow).where(
            ResourceRow.account_id == self.account_id,
            ResourceRow.current.is_(True),
            ResourceRow.resource_type == rtype,
        )
        if patient:
            query = query.where(ResourceRow.patient_id == patient.removeprefix("Patient/"))
        total = self.session.scalar(select(func.count()).select_from(query.subquery())) or 0
        rows = self.session.scalars(
            query.order_by(ResourceRow.resource_id).limit(min(count, SEARCH_MAX)).offset(offset)
        )
        return list(rows), total

    def update(
        self,
        rtype: str,
        rid: str,
        resource: Any,
        *,
        if_match: str | None,
        source: str | None,
        now: datetime,
    ) -> tuple[ResourceRow, bool]:
        """FHIR update (PUT). Identical content makes no new version. Returns (row, changed)."""
        if not isinstance(resource, dict) or resource.get("resourceType") != rtype:
            raise BadRequest(f"the body must be a {rtype} resource", code="invalid_resource")
        if resource.get("id", rid) != rid:
            raise BadRequest("the resource id does not match the URL", code="id_mismatch")
        if not fhir.ID_RE.fullmatch(rid):
            raise BadRequest("not a valid FHIR id", code="invalid_id")
        errors = [m for sev, m in fhir.light_problems(resource) if sev == "error"]
        if errors:
            raise BadRequest("; ".join(errors), code="invalid_resource")
        current = self.current(rtype, rid)
        if if_match is not None:
            expected = if_match.strip().removeprefix("W/").strip('"')
            if current is None or str(current.version_id) != expected:
                raise PreconditionFailed(
                    f"If-Match {if_match} does not match the current version "
                    f"{'(none)' if current is None else etag(current)}"
                )
        new = NewVersion.of(
            {**resource, "id": rid}, source or (resource.get("meta") or {}).get("source")
        )
        if (
            current is not None
            and current.content_hash == new.content_hash
            and current.source == new.source
        ):
            return current, False
        write_versions(
            self.session,
            self.account_id,
            [(new, current.version_id if current else 0)],
            now=now,
            import_id=None,
        )
        self.session.commit()
        return self.read(rtype, rid), True

    def revert(self, rtype: str, rid: str, version: str, *, now: datetime) -> ResourceRow:
        """Write an old version's content back as a new version (history stays whole)."""
        old = self.vread(rtype, rid, version)
        current = self.read(rtype, rid)
        if current.version_id == old.version_id:
            return current
        new = NewVersion.of(orjson.loads(old.content), old.source)
        write_versions(
            self.session, self.account_id, [(new, current.version_id)], now=now, import_id=None
        )
        self.session.commit()
        return self.read(rtype, rid)

    # -- conflicts -------------------------------------------------------------------------

    def conflicts(self, *, include_resolved: bool = False) -> list[ResourceConflict]:
        query = select(ResourceConflict).where(ResourceConflict.account_id == self.account_id)
        if not include_resolved:
            query = query.where(ResourceConflict.resolved_at.is_(None))
        return list(self.session.scalars(query.order_by(ResourceConflict.id)))

    def conflict(self, conflict_id: int) -> ResourceConflict:
        if not 0 < conflict_id <= CONFLICT_ID_MAX:  # never sent to the driver: a 404, not a 500
            raise NotFound("no such conflict")
        found = self.session.get(ResourceConflict, conflict_id)
        if found is None or found.account_id != self.account_id:
            raise NotFound("no such conflict")
        return found

    def resolve(self, conflict_id: int, choice: str, *, now: datetime) -> dict[str, Any]:
        """keep-stored: drop the incoming version; take-incoming: it becomes the current
        version; keep-both: it is stored beside the current one under a new id."""
        found = self.conflict(conflict_id)
        if found.resolved_at is not None:
            raise Conflict("this conflict is already resolved", code="already_resolved")
        incoming = orjson.loads(found.incoming_content)
        result: dict[str, Any] = {"conflict": found.id, "resolution": choice}
        if choice == "keep-stored":
            pass
        elif choice == "take-incoming":
            current = self.read(found.resource_type, found.resource_id)
            new = NewVersion.of({**incoming, "id": found.resource_id}, found.incoming_source)
            write_versions(
                self.session,
                self.account_id,
                [(new, current.version_id)],
                now=now,
                import_id=found.import_id,
            )
            result["reference"] = f"{found.resource_type}/{found.resource_id}"
        elif choice == "keep-both":
            alt_id = f"{found.resource_id[:48]}-alt{found.id}"
            new = NewVersion.of({**incoming, "id": alt_id}, found.incoming_source)
            write_versions(
                self.session, self.account_id, [(new, 0)], now=now, import_id=found.import_id
            )
            result["reference"] = f"{found.resource_type}/{alt_id}"
        else:
            raise BadRequest(
                "resolution must be keep-stored, take-incoming or keep-both",
                code="invalid_resolution",
            )
        found.resolved_at = now
        found.resolution = choice
        self.session.commit()
        return result

    def only_patient(self) -> str | None:
        """The id of the record's Patient, when it has exactly one."""
        ids = self.session.scalars(
            select(ResourceRow.resource_id)
            .where(
                ResourceRow.account_id == self.account_id,
                ResourceRow.resource_type == "Patient",
                ResourceRow.current.is_(True),
            )
            .limit(2)
        ).all()
        return ids[0] if len(ids) == 1 else None

    def rows_for(self, keys: Iterable[tuple[str, str]]) -> list[ResourceRow]:
        keys = list(keys)
        if not keys:
            return []
        return list(
            self.session.scalars(
                select(ResourceRow).where(
                    ResourceRow.account_id == self.account_id,
                    ResourceRow.current.is_(True),
                    tuple_(ResourceRow.resource_type, ResourceRow.resource_id).in_(keys),
                )
            )
        )
