"""Links made from an account's record instead of an upload, and keeping L links current.

A link's ``record_query`` says what to export (the whole record, a patient, a date range,
resource types, or the emergency summary). Whenever the record changes, every live L link
made from it gets its file regenerated and re-encrypted (same key, new IV).
"""

from __future__ import annotations

import json
import tempfile
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shlhost.errors import BadRequest
from shlhost.phr.exporter import Exporter, Selection
from shlhost.phr.formats import FHIR_JSON, SPOOL_MEMORY, PreparedFile
from shlhost.shl.links import LinkService
from shlhost.storage.models import Link

QUERY_KEYS = ("summary", "patient", "start", "end", "types")


def normalise_query(raw: Any) -> dict[str, Any]:
    """Check a ``record`` request: which part of the record the link carries."""
    if raw is True or raw == "all":
        raw = {}
    if raw == "summary":
        raw = {"summary": True}
    if not isinstance(raw, dict):
        raise BadRequest(
            'record must be "all", "summary" or an object with summary, patient, start, end, types',
            code="invalid_record_query",
        )
    unknown = set(raw) - set(QUERY_KEYS)
    if unknown:
        raise BadRequest(
            f"record does not take {', '.join(sorted(unknown))}", code="invalid_record_query"
        )
    types = raw.get("types")
    if isinstance(types, list):
        types = ",".join(str(t) for t in types)
    query = {
        "summary": bool(raw.get("summary")),
        "patient": raw.get("patient"),
        "start": raw.get("start"),
        "end": raw.get("end"),
        "types": types,
    }
    selection(query)  # validates
    return query


def selection(query: dict[str, Any]) -> Selection:
    return Selection.parse(
        patient=query.get("patient"),
        types=query.get("types"),
        start=query.get("start"),
        end=query.get("end"),
        summary=bool(query.get("summary")),
    )


def record_file(
    sessions: sessionmaker[Session], account_id: int, query: dict[str, Any]
) -> PreparedFile:
    """The link's file: a document Bundle exported from the record."""
    out = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)  # noqa: SIM115 - the link's file
    for chunk in Exporter(sessions, account_id, selection(query)).bundle():
        out.write(chunk)
    out.seek(0)
    return PreparedFile(FHIR_JSON, out)


def refresh_links(
    service: LinkService, sessions: sessionmaker[Session], account_id: int, *, now: datetime
) -> int:
    """Regenerate the file of every live L link made from this account's record."""
    wanted = service.session.execute(
        select(Link.id, Link.record_query).where(
            Link.account_id == account_id,
            Link.record_query.is_not(None),
            Link.long_term.is_(True),
            Link.revoked_at.is_(None),
        )
    ).all()
    # The exports below read in their own transactions: hold no lock while they run.
    service.session.rollback()
    refreshed = 0
    for link_id, query in wanted:
        fresh = record_file(sessions, account_id, json.loads(query or "{}"))
        link = service.session.get(Link, link_id)
        files = [f for f in link.files if f.blob_key] if link else []
        if link is None or not files:
            service.session.rollback()
            continue
        service.replace_file(link, files[0].id, fresh, now=now)  # commits
        refreshed += 1
    return refreshed
