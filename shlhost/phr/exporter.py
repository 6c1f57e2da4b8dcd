"""$phr-export: a patient's record as a document Bundle, NDJSON, .phr or .sphr.

Rows are read in chunks, each in its own short transaction (keyset pagination on the
primary key), so memory stays flat however large the record, and a slow download never
holds a database lock. What a selection references comes along: no dangling references.
"""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import IO, Any

import orjson
import pyzipper
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shlhost.errors import BadRequest
from shlhost.phr import fhir
from shlhost.phr.store import render
from shlhost.storage.models import ResourceRow

CHUNK = 1000
# What an export reads of each row: everything render() and the filters need.
ROW_COLUMNS = (
    ResourceRow.resource_type,
    ResourceRow.resource_id,
    ResourceRow.version_id,
    ResourceRow.last_updated,
    ResourceRow.content,
    ResourceRow.source,
    ResourceRow.current,
    ResourceRow.patient_id,
    ResourceRow.clinical_date,
)
FORMATS = ("bundle", "ndjson", "phr", "sphr")
# Provenance that shlhost wrote for its own imports is server metadata, not the record.
IMPORT_PROVENANCE = re.compile(r"import-\d+")
_PARTIAL_DATE = re.compile(r"(\d{4})(?:-(\d{2}))?(?:-(\d{2}))?")
_EXT = {
    "image/jpeg": ".jpg",
    "image/png": ".png",
    "image/gif": ".gif",
    "image/webp": ".webp",
    "application/pdf": ".pdf",
    "application/dicom": ".dcm",
    "text/plain": ".txt",
    "application/xml": ".xml",
}

# International Patient Summary sections (LOINC) and what fills them.
SUMMARY_SECTIONS = [
    ("Allergies and intolerances", "48765-2", ("AllergyIntolerance",)),
    ("Medication summary", "10160-0", ("MedicationStatement", "MedicationRequest")),
    ("Problem list", "11450-4", ("Condition",)),
    ("Immunizations", "11369-6", ("Immunization",)),
]
SUMMARY_TYPES = tuple(t for _title, _code, types in SUMMARY_SECTIONS for t in types)


def date_bounds(start: str | None, end: str | None) -> tuple[str | None, str | None]:
    """``start`` and ``end`` as a year, year-month or date -> an inclusive lower bound and an
    exclusive upper bound comparable with ISO 8601 text (``end`` covers its whole period)."""
    low = high = None
    if start:
        m = _PARTIAL_DATE.fullmatch(start)
        if not m:
            raise BadRequest(
                "start must be a year, year-month or date (2010, 2010-06, 2010-06-30)",
                code="invalid_start",
            )
        low = start
    if end:
        m = _PARTIAL_DATE.fullmatch(end)
        if not m:
            raise BadRequest(
                "end must be a year, year-month or date (2020, 2020-06, 2020-06-30)",
                code="invalid_end",
            )
        year, month, day = m.group(1), m.group(2), m.group(3)
        if day:
            try:
                d = datetime(int(year), int(month), int(day))
            except ValueError:
                raise BadRequest("end is not a calendar date", code="invalid_end") from None
            high = (d + timedelta(days=1)).strftime("%Y-%m-%d")
        elif month:
            if not 1 <= int(month) <= 12:
                raise BadRequest("end has no such month", code="invalid_end")
            high = f"{int(year) + 1}-01" if month == "12" else f"{year}-{int(month) + 1:02d}"
        else:
            high = str(int(year) + 1)
    if low and high and low >= high:
        raise BadRequest("start is after end", code="invalid_range")
    return low, high


@dataclass
class Selection:
    """What to export. Empty fields select everything."""

    patient: str | None = None
    types: tuple[str, ...] = ()
    start: str | None = None
    end: str | None = None
    since: datetime | None = None
    summary: bool = False

    @classmethod
    def parse(
        cls,
        *,
        patient: str | None = None,
        types: str | None = None,
        start: str | None = None,
        end: str | None = None,
        since: str | None = None,
        summary: bool = False,
    ) -> Selection:
        kinds: tuple[str, ...] = ()
        if types:
            kinds = tuple(t.strip() for t in types.split(",") if t.strip())
            unknown = [t for t in kinds if t not in fhir.R4_RESOURCE_TYPES]
            if unknown:
                raise BadRequest(
                    f"_type names unknown resource types: {', '.join(unknown)}", code="invalid_type"
                )
        when = fhir.parse_instant(since) if since else None
        pid = None
        if patient:
            pid = patient.removeprefix("Patient/")
            if not fhir.ID_RE.fullmatch(pid):
                raise BadRequest("patient must be Patient/<id>", code="invalid_patient")
        low, high = date_bounds(start, end)
        return cls(pid, kinds, low, high, when, summary)

    @property
    def filtered(self) -> bool:
        return bool(
            self.patient or self.types or self.start or self.end or self.since or self.summary
        )

    def wants(self, row: Any) -> bool:
        """Does a current row belong to the primary selection?"""
        if row.resource_type == "Provenance" and IMPORT_PROVENANCE.fullmatch(row.resource_id):
            return False
        if self.patient and row.patient_id != self.patient:
            return False
        types = SUMMARY_TYPES if self.summary else self.types
        if types and row.resource_type not in types:
            return False
        if self.since and row.last_updated <= self.since:
            return False
        if self.start or self.end:
            date = row.clinical_date
            if date is None:
                return False  # undated resources come along only when referenced
            if self.start and date < self.start:
                return False
            if self.end and date >= self.end:
                return False
        return True


@dataclass
class Exported:
    """Counts kept while streaming (for logs and tests)."""

    resources: int = 0
    errors: int = 0


class Exporter:
    def __init__(
        self, sessions: sessionmaker[Session], account_id: int, selection: Selection
    ) -> None:
        self.sessions = sessions
        self.account_id = account_id
        self.selection = selection
        self.stats = Exported()

    # -- reading ------------------------------------------------------------------------

    def _types(self) -> list[str]:
        with self.sessions() as session:
            return sorted(
                session.scalars(
                    select(ResourceRow.resource_type)
                    .where(ResourceRow.account_id == self.account_id)
                    .distinct()
                )
            )

    def _rows_of_type(self, rtype: str) -> Iterator[Any]:
        """Current rows of one type, by id, CHUNK at a time, each chunk its own transaction."""
        after = ""
        while True:
            with self.sessions() as session:
                # A range scan of ix_resources_current_type: no sort, however large the record.
                chunk = session.execute(
                    select(*ROW_COLUMNS)
                    .where(
                        ResourceRow.account_id == self.account_id,
                        ResourceRow.resource_type == rtype,
                        ResourceRow.current.is_(True),
                        ResourceRow.resource_id > after,
                    )
                    .order_by(ResourceRow.resource_id)
                    .limit(CHUNK)
                ).all()
            if not chunk:
                return
            yield from chunk
            after = chunk[-1].resource_id
            if len(chunk) < CHUNK:
                return

    def _rows_by_key(self, keys: list[tuple[str, str]]) -> Iterator[Any]:
        by_type: dict[str, list[str]] = {}
        for rtype, rid in keys:
            by_type.setdefault(rtype, []).append(rid)
        for rtype, ids in sorted(by_type.items()):
            for start in range(0, len(ids), CHUNK):
                with self.sessions() as session:
                    yield from (
                        r
                        for r in session.execute(
                            select(*ROW_COLUMNS).where(
                                ResourceRow.account_id == self.account_id,
                                ResourceRow.resource_type == rtype,
                                ResourceRow.resource_id.in_(ids[start : start + CHUNK]),
                            )
                        ).all()
                        if r.current
                    )

    def rows(self) -> Iterator[Any]:
        """The selection, then (transitively) what it references, each row once.

        Patients come first (the .phr convention), then the other types in name order.
        """
        sel = self.selection
        included: set[tuple[str, str]] = set()
        wanted: set[tuple[str, str]] = set()
        types = self._types()
        order = (["Patient"] if "Patient" in types else []) + [t for t in types if t != "Patient"]
        for rtype in order:
            primary_type = (
                not sel.filtered
                or rtype == "Patient"
                or not (sel.summary or sel.types)
                or rtype in (SUMMARY_TYPES if sel.summary else sel.types)
            )
            if not primary_type:
                continue
            for row in self._rows_of_type(rtype):
                is_patient = rtype == "Patient" and (
                    sel.patient is None or row.resource_id == sel.patient
                )
                if not (sel.wants(row) or (is_patient and not sel.since)):
                    continue
                if sel.filtered:  # the whole record needs no closure: keep no per-row state
                    included.add((rtype, row.resource_id))
                    wanted.update(self._refs(row.content))
                yield row
        # The closure: what the selection points at, and what that points at, ...
        while True:
            missing = sorted(k for k in wanted - included)
            if not missing:
                return
            wanted = set()
            for row in self._rows_by_key(missing):
                included.add((row.resource_type, row.resource_id))
                wanted.update(self._refs(row.content))
                yield row
            included.update(missing)  # keys that do not exist are not looked for again

    @staticmethod
    def _refs(content: str) -> set[tuple[str, str]]:
        found = set()
        for ref in fhir.references(orjson.loads(content)):
            rtype, _, rest = ref.partition("/")
            rid = rest.split("/", 1)[0]
            if rtype in fhir.R4_RESOURCE_TYPES and fhir.ID_RE.fullmatch(rid):
                found.add((rtype, rid))
        return found

    def resources(self) -> Iterator[dict[str, Any]]:
        """Rendered resources; a row that fails to render becomes an OperationOutcome."""
        for row in self.rows():
            try:
                resource = render(row)
            except Exception as exc:  # noqa: BLE001 - reported in the stream, and the stream goes on
                self.stats.errors += 1
                name = f"{row.resource_type}/{row.resource_id}"
                yield outcome_line(f"{name} could not be exported ({type(exc).__name__})")
                continue
            self.stats.resources += 1
            yield resource

    # -- formats ------------------------------------------------------------------------

    def ndjson(self, *, cover: bool = False) -> Iterator[bytes]:
        """One resource a line. With ``cover`` (the .phr convention) a Composition first."""
        if cover:
            yield orjson.dumps(self.composition(self._keys())) + b"\n"
        for resource in self.resources():
            yield orjson.dumps(resource) + b"\n"

    def _keys(self) -> list[tuple[str, str, str | None]]:
        return [(r.resource_type, r.resource_id, r.patient_id) for r in self.rows()]

    def composition(self, keys: list[tuple[str, str, str | None]]) -> dict[str, Any]:
        patients = [rid for rtype, rid, _p in keys if rtype == "Patient"]
        subject = {"reference": f"Patient/{patients[0]}"} if len(patients) == 1 else None
        now = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        sections: list[dict[str, Any]]
        if self.selection.summary:
            sections = []
            for title, code, types in SUMMARY_SECTIONS:
                entries = [{"reference": f"{t}/{i}"} for t, i, _p in keys if t in types]
                section: dict[str, Any] = {
                    "title": title,
                    "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                }
                if entries:
                    section["entry"] = entries
                else:
                    section["emptyReason"] = {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/list-empty-reason",
                                "code": "unavailable",
                            }
                        ]
                    }
                sections.append(section)
            title, code = "International Patient Summary", "60591-5"
        else:
            by_type: dict[str, list[dict[str, str]]] = {}
            for rtype, rid, _p in keys:
                if rtype != "Patient":
                    by_type.setdefault(rtype, []).append({"reference": f"{rtype}/{rid}"})
            sections = [{"title": rtype, "entry": refs} for rtype, refs in sorted(by_type.items())]
            title, code = "Personal health record", "60591-5"
        comp: dict[str, Any] = {
            "resourceType": "Composition",
            "id": f"export-{uuid.uuid4()}",
            "meta": {"tag": [fhir.EXPORT_COVER_TAG]},
            "status": "final",
            "type": {
                "coding": [
                    {
                        "system": "http://loinc.org",
                        "code": code,
                        "display": "Patient summary Document",
                    }
                ]
            },
            "date": now,
            "author": [{"display": "shlhost $phr-export"}],
            "title": title,
            "section": sections,
        }
        if subject:
            comp["subject"] = subject
        return comp

    def bundle(self) -> Iterator[bytes]:
        """A document Bundle, streamed: its cover Composition first, then every resource."""
        comp = self.composition(self._keys())
        base = "urn:uuid:"
        now = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        yield (
            b'{"resourceType":"Bundle","type":"document","identifier":{"system":"urn:ietf:rfc:3986","value":"'
            + f"urn:uuid:{uuid.uuid4()}".encode()
            + b'"},"timestamp":"'
            + now.encode()
            + b'","entry":['
        )
        yield orjson.dumps({"fullUrl": f"{base}{uuid.uuid4()}", "resource": comp})
        for resource in self.resources():
            entry = {
                "fullUrl": f"{resource['resourceType']}/{resource['id']}",
                "resource": resource,
            }
            yield b"," + orjson.dumps(entry)
        yield b"]}"

    def sphr(self, out: IO[bytes], password: str, name: str) -> None:
        """Write a .sphr: an AES-256 ZIP (WinZip AE-2, DEFLATE) with ``<name>.phr`` and the
        record's attachments under ``attachments/`` (see docs/formats.md)."""
        if not password:
            raise BadRequest(
                "a .sphr needs a password (X-SPHR-Password)", code="sphr_password_required"
            )
        import tempfile

        with (
            pyzipper.AESZipFile(
                out, "w", compression=pyzipper.ZIP_DEFLATED, encryption=pyzipper.WZ_AES
            ) as archive,
            tempfile.NamedTemporaryFile() as phr,
        ):
            archive.setpassword(password.encode())
            archive.setencryption(pyzipper.WZ_AES, nbits=256)
            phr.write(orjson.dumps(self.composition(self._keys())) + b"\n")
            attachments: dict[str, str] = {}
            # Binary sorts before the types that point at it (DocumentReference, Media, ...),
            # so each attachment is in the archive before anything links to it.
            for resource in self.resources():
                if resource.get("resourceType") == "Binary" and isinstance(
                    resource.get("data"), str
                ):
                    ext = _EXT.get(resource.get("contentType", ""), ".bin")
                    path = f"attachments/{resource['id']}{ext}"
                    archive.writestr(path, base64.b64decode(resource["data"]))
                    attachments[f"Binary/{resource['id']}"] = path
                    continue
                phr.write(relink(resource, attachments) + b"\n")
            phr.flush()
            archive.write(phr.name, f"{name}.phr")


def relink(resource: dict[str, Any], attachments: dict[str, str]) -> bytes:
    """Attachment URLs that point at exported Binaries -> relative paths inside the archive."""
    from shlhost.phr.formats import attachments_of

    for att in attachments_of(resource):
        url = att.get("url")
        if isinstance(url, str) and url in attachments:
            att["url"] = attachments[url]
    return orjson.dumps(resource)


def outcome_line(message: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "processing", "diagnostics": message}],
    }


def safe_filename(text: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", text)[:80]
    return cleaned or "record"


Renderer = Callable[[], Iterator[bytes]]
