"""$import: bring a record (NDJSON/.phr, a Bundle, or a .sphr) into an account's store.

Merge rules (``strategy=merge``), for each incoming resource:

1. Find the stored resource it is: same type and logical id; else same type and a shared
   business identifier (the incoming one takes the stored id); else, same type and the
   same content under another id (a duplicate: nothing to do).
2. Same content (ignoring id and meta) -> unchanged.
3. Different content from the same source as the stored version -> a new version.
4. Only the narrative (``text``) differs, and the sources differ -> unchanged.
5. Anything else (another source disagrees, or the same file holds two different
   resources under one id) -> a conflict: the stored version stays current, the incoming
   one is kept beside it with its provenance until the owner resolves it.

``strategy=replace`` takes rule 3 for every difference (the incoming file is the truth).
One import is one transaction: everything it accepted is committed, or nothing is.
"""

from __future__ import annotations

import base64
import gc
import hashlib
import json
import posixpath
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, Any

import ijson
import orjson
from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from shlhost.errors import BadRequest, PayloadTooLarge, Unprocessable
from shlhost.phr import fhir
from shlhost.phr.formats import (
    IJSON_BUFFER,
    Problem,
    attachments_of,
    clean_resource,
    guess_type,
    iter_ndjson_stream,
    open_sphr,
)
from shlhost.phr.store import NewVersion, write_versions
from shlhost.storage.models import ImportRecord, ResourceConflict, ResourceIdentifier, ResourceRow

BATCH = 2000
SEEN_PREFIX = 16  # hex digits of a content hash kept per resource: 64 bits
CHUNK = 1000  # keys per lookup query (well under every driver's parameter limit)
MAX_LINE = 64 * 1024 * 1024
MAX_ISSUES = 1000
STRATEGIES = ("merge", "replace")

Item = tuple[str, dict[str, Any] | None, list[Problem]]  # (where, resource, problems)


@dataclass
class ImportOptions:
    source: str = "unspecified"
    strategy: str = "merge"
    validate_only: bool = False
    strict: bool = False
    format: str = "ndjson"
    # A pull from a remote: a stored version written by hand here (PUT, revert, a resolved
    # conflict: no import) is a local edit, and a remote that differs from it is a conflict
    # even when the sources agree.
    protect_local_edits: bool = False


@dataclass
class ImportResult:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("created", "updated", "unchanged", "conflicts", "errors", "warnings"), 0))
    issues: list[dict[str, Any]] = field(default_factory=list)
    import_id: int | None = None
    provenance: str | None = None
    committed: bool = False

    def note(self, severity: str, message: str, where: str | None = None) -> None:
        self.counts["errors" if severity == "error" else "warnings"] += severity in ("error", "warning")
        if len(self.issues) < MAX_ISSUES:
            issue: dict[str, Any] = {"severity": severity, "code": "processing" if severity == "error" else "informational",
                                     "diagnostics": f"{where}: {message}" if where else message}
            if where:
                issue["location"] = [where]
            self.issues.append(issue)


@dataclass
class _Current:
    version: int
    hash: str
    source: str | None
    local: bool = False  # written outside any import (see ImportOptions.protect_local_edits)


class Importer:
    def __init__(self, session: Session, account_id: int, options: ImportOptions, *, now: datetime) -> None:
        if "\x00" in options.source:
            raise BadRequest("source must not contain NUL characters", code="invalid_source")
        if options.strategy not in STRATEGIES:
            raise BadRequest(f"strategy must be one of {', '.join(STRATEGIES)}", code="invalid_strategy")
        self.session = session
        self.account_id = account_id
        self.options = options
        self.now = now
        self.result = ImportResult()
        self.state: dict[tuple[str, str], _Current] = {}
        # Content hash of each key's first occurrence in this file: later ones are judged
        # against it, so the same file always gives the same result.
        # The only per-resource memory kept for a whole import (about 200 bytes a resource):
        # "Type/id" -> a prefix of the content hash of its first occurrence.
        self.seen: dict[str, str] = {}
        self.pending: set[tuple[str, str]] = set()
        self.absent: set[tuple[str, str]] = set()  # keys looked up and not stored
        self.has_open_conflicts = session.execute(select(ResourceConflict.id).where(
            ResourceConflict.account_id == account_id, ResourceConflict.resolved_at.is_(None)).limit(1)).first() is not None
        self.open_conflicts: set[tuple[str, str, str]] = set()
        self.targets: list[str] = []
        self.conditional_cache: dict[str, str | None] = {}
        self.record = ImportRecord(account_id=account_id, created_at=now, source=options.source[:500],
                                   format=options.format, counts="{}")
        session.add(self.record)
        session.flush()
        self.result.import_id = self.record.id

    # -- the pipeline --------------------------------------------------------------------

    def run(self, items: Iterable[Item]) -> ImportResult:
        # Parsing a large file allocates millions of containers and no reference cycles;
        # the cyclic collector would spend a third of the import walking them.
        collecting = gc.isenabled()
        gc.disable()
        try:
            batch: list[tuple[str, NewVersion]] = []
            for where, resource, problems in items:
                prepared = self._prepare(where, resource, problems)
                if prepared is not None:
                    batch.append((where, prepared))
                if len(batch) >= BATCH:
                    self._apply(batch)
                    batch = []
            self._apply(batch)
            if self.options.strict and self.result.counts["errors"]:
                raise Unprocessable("strict import refused: the file has errors (nothing was written)",
                                    code="strict_import_failed", issues=self.result.issues)
            self._finish()
        except BaseException:
            self.session.rollback()
            raise
        finally:
            if collecting:
                gc.enable()
        return self.result

    def _prepare(self, where: str, resource: dict[str, Any] | None, problems: list[Problem]) -> NewVersion | None:
        for p in problems:
            self.result.note(p.severity, p.message, p.where() or where)
        if resource is None:
            return None
        rtype = resource["resourceType"]
        if rtype == "Composition" and fhir.is_export_cover(resource):
            return None  # shlhost's own cover page of an export: not part of the record
        fatal = False
        for severity, message in fhir.light_problems(resource):
            self.result.note(severity, message, where)
            fatal |= severity == "error"
        if self.options.strict and not fatal:
            for message in fhir.strict_problems(resource):
                self.result.note("error", message, where)
                fatal = True
        if fatal:
            return None
        rid = resource.get("id")
        if not isinstance(rid, str) or not fhir.ID_RE.fullmatch(rid):
            new_id = fhir.derived_id(resource)
            if rid is not None:
                self.result.note("warning", f"{rtype} id {str(rid)[:70]!r} is not a valid FHIR id; stored as {new_id}", where)
            resource = {**resource, "id": new_id}
        if self.options.format == "bundle":
            resource = self._resolve_conditionals(resource, where)
        meta = resource.get("meta") if isinstance(resource.get("meta"), dict) else {}
        source = meta.get("source") if isinstance(meta.get("source"), str) else self.options.source
        return NewVersion.of(resource, source)

    def _resolve_conditionals(self, resource: dict[str, Any], where: str) -> dict[str, Any]:
        """``Type?identifier=system|value`` references the Bundle left open, resolved against
        the store when exactly one stored resource carries that identifier."""
        pending = [r for r in fhir.references(resource) if "?" in r]
        if not pending:
            return resource
        resolved = fhir.rewrite_references(resource, self._conditional_target)
        for ref in [r for r in fhir.references(resolved) if "?" in r][:3]:
            self.result.note("warning", f"conditional reference {ref} matches nothing in the file or the store", where)
        return resolved

    def _conditional_target(self, reference: str) -> str | None:
        if "?" not in reference:
            return None
        if reference in self.conditional_cache:
            return self.conditional_cache[reference]
        rtype, _, query = reference.partition("?")
        target = None
        for part in query.split("&"):
            name, _, value = part.partition("=")
            if name != "identifier" or rtype not in fhir.R4_RESOURCE_TYPES:
                continue
            system, bar, code = value.rpartition("|")
            ids = self.session.scalars(select(ResourceIdentifier.resource_id).where(
                ResourceIdentifier.account_id == self.account_id, ResourceIdentifier.resource_type == rtype,
                ResourceIdentifier.system == (system if bar else ""), ResourceIdentifier.value == code).limit(2)).all()
            if len(ids) == 1:
                target = f"{rtype}/{ids[0]}"
        self.conditional_cache[reference] = target
        return target

    def _apply(self, batch: list[tuple[str, NewVersion]]) -> None:
        if not batch:
            return
        self._prefetch([(v.resource_type, v.resource_id) for _w, v in batch])
        self._match_identifiers(batch)
        self._prefetch([(v.resource_type, v.resource_id) for _w, v in batch])
        duplicates = self._content_matches(batch)
        writes: list[tuple[NewVersion, int]] = []
        conflicts: list[dict[str, Any]] = []
        counts = self.result.counts
        for where, new in batch:
            key = (new.resource_type, new.resource_id)
            first = self.seen.setdefault(f"{key[0]}/{key[1]}", new.content_hash[:SEEN_PREFIX])
            current = self.state.get(key)
            if first != new.content_hash[:SEEN_PREFIX]:
                decision = self._in_file_duplicate(key, new, writes)
            elif current is None:
                if (new.resource_type, new.content_hash) in duplicates:
                    counts["unchanged"] += 1
                    continue
                decision = "create"
            elif current.hash == new.content_hash:
                counts["unchanged"] += 1
                continue
            else:
                decision = self._decide(current, new)
            if decision == "create":
                self.state[key] = _Current(1, new.content_hash, new.source)
                writes.append((new, 0))
                self.pending.add(key)
                counts["created"] += 1
            elif decision == "update":
                assert current is not None
                if key in self.pending:  # this import wrote an earlier version: write it first
                    self._apply_writes(writes)
                    writes = []
                writes.append((new, current.version))
                self.pending.add(key)
                self.state[key] = _Current(current.version + 1, new.content_hash, new.source)
                counts["updated"] += 1
            elif decision == "unchanged":
                counts["unchanged"] += 1
            elif decision == "narrative":
                counts["unchanged"] += 1
                self.result.note("information", f"{key[0]}/{key[1]}: only the narrative differs; kept the stored one", where)
            else:
                assert current is not None
                marker = (key[0], key[1], new.content_hash)
                if marker in self.open_conflicts:
                    counts["unchanged"] += 1  # the same disagreement is already waiting for the owner
                    continue
                self.open_conflicts.add(marker)
                conflicts.append({
                    "account_id": self.account_id, "resource_type": key[0], "resource_id": key[1],
                    "stored_version": current.version, "incoming_content": orjson.dumps(new.resource).decode(),
                    "incoming_hash": new.content_hash, "incoming_source": new.source, "import_id": self.record.id,
                    "created_at": self.now,
                })
                counts["conflicts"] += 1
                self.result.note("warning", f"{key[0]}/{key[1]} disagrees with the stored version "
                                            f"{current.version}: both kept (see $conflicts)", where)
        self._apply_writes(writes)
        if conflicts:
            self.session.execute(insert(ResourceConflict.__table__), conflicts)
        # Everything this batch learnt is in the database now (same transaction): the next
        # batch reads what it needs again, so memory does not grow with the file.
        self.state.clear()
        self.absent.clear()

    def _apply_writes(self, writes: list[tuple[NewVersion, int]]) -> None:
        self.pending.clear()
        write_versions(self.session, self.account_id, writes, now=self.now, import_id=self.record.id)
        self.targets.extend(f"{v.resource_type}/{v.resource_id}/_history/{prev + 1}" for v, prev in writes)

    def _decide(self, current: _Current, new: NewVersion) -> str:
        if self.options.protect_local_edits and current.local:
            return self._narrative_or_conflict(current, new)
        if self.options.strategy == "replace" or current.source == new.source:
            return "update"
        return self._narrative_or_conflict(current, new)

    def _in_file_duplicate(self, key: tuple[str, str], new: NewVersion, writes: list[tuple[NewVersion, int]]) -> str:
        """The file holds this id again, with other content than its first occurrence."""
        current = self.state.get(key)
        if current is None:
            return "unchanged"  # the first occurrence was a duplicate of stored content
        if current.hash == new.content_hash:
            return "unchanged"
        if self.options.strategy == "replace":
            return "update"
        if key in self.pending:
            self._apply_writes(writes)  # so the comparison below can read it
            writes.clear()
        return self._narrative_or_conflict(current, new)

    def _narrative_or_conflict(self, current: _Current, new: NewVersion) -> str:
        text = self.session.scalar(select(ResourceRow.content).where(
            ResourceRow.account_id == self.account_id, ResourceRow.resource_type == new.resource_type,
            ResourceRow.resource_id == new.resource_id, ResourceRow.version_id == current.version))
        stored = orjson.loads(text) if text is not None else {}
        if fhir.content_hash(stored, clinical_only=True) == fhir.content_hash(new.resource, clinical_only=True):
            return "narrative"
        # Another source disagrees, or one file holds two different resources under one id.
        return "conflict"

    # -- lookups, one query per batch --------------------------------------------------------

    def _prefetch(self, keys: list[tuple[str, str]]) -> None:
        """Load the current version of every key not yet known, per type and in chunks, so
        that each query is an index range on (account, type, id)."""
        by_type: dict[str, set[str]] = {}
        for key in keys:
            if key not in self.state and key not in self.absent:
                by_type.setdefault(key[0], set()).add(key[1])
                self.absent.add(key)  # until a row below says otherwise
        for rtype, ids in by_type.items():
            id_list = sorted(ids)
            for start in range(0, len(id_list), CHUNK):
                chunk = id_list[start:start + CHUNK]
                # No "current" in the WHERE: with it, SQLite's planner prefers the
                # (account, current, type) index and scans every resource of the type.
                rows = self._raw_in(
                    "SELECT resource_id, version_id, content_hash, source, current, import_id FROM resources "
                    "WHERE account_id = {} AND resource_type = {} AND resource_id IN ({})",
                    [self.account_id, rtype], chunk)
                for rid, version, digest, source, current, import_id in rows:
                    if current:
                        self.state[(rtype, rid)] = _Current(version, digest, source, import_id is None)
                        self.absent.discard((rtype, rid))
                if self.has_open_conflicts:
                    for r in self.session.execute(select(ResourceConflict.resource_id, ResourceConflict.incoming_hash)
                                                  .where(ResourceConflict.account_id == self.account_id,
                                                         ResourceConflict.resolved_at.is_(None),
                                                         ResourceConflict.resource_type == rtype,
                                                         ResourceConflict.resource_id.in_(chunk))):
                        self.open_conflicts.add((rtype, r.resource_id, r.incoming_hash))

    def _raw_in(self, sql: str, fixed: list[Any], values: list[str]) -> list[tuple[Any, ...]]:
        """Run a lookup with an IN list straight on the driver: on the hot path of every
        import, SQLAlchemy's per-parameter compilation cost more than the query itself.
        ``sql`` has one ``{}`` per fixed parameter and a last ``{}`` for the IN list."""
        conn = self.session.connection()
        mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
        text = sql.format(*([mark] * len(fixed)), ", ".join([mark] * len(values)))
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(text, [*fixed, *values])
            return list(cursor.fetchall())
        finally:
            cursor.close()

    def _match_identifiers(self, batch: list[tuple[str, NewVersion]]) -> None:
        """An unknown id that shares a business identifier with ONE stored resource of the
        same patient is that resource. (Shared identifiers exist: Synthea gives every claim
        the same group number; those never match.)"""
        wanted: dict[tuple[str, str, str], list[NewVersion]] = {}
        for _w, new in batch:
            if (new.resource_type, new.resource_id) not in self.state:
                for system, value in fhir.identifiers(new.resource):
                    wanted.setdefault((new.resource_type, system, value), []).append(new)
        if not wanted:
            return
        owners: dict[tuple[str, str, str], set[tuple[str, str | None]]] = {}
        by_system: dict[tuple[str, str], list[str]] = {}
        for rtype, system, value in wanted:
            by_system.setdefault((rtype, system), []).append(value)
        for (rtype, system), values in by_system.items():
            for start in range(0, len(values), 500):
                rows = self.session.execute(select(
                    ResourceIdentifier.value, ResourceIdentifier.resource_id, ResourceRow.patient_id,
                ).join(ResourceRow, (ResourceRow.account_id == ResourceIdentifier.account_id)
                       & (ResourceRow.resource_type == ResourceIdentifier.resource_type)
                       & (ResourceRow.resource_id == ResourceIdentifier.resource_id) & ResourceRow.current.is_(True))
                  .where(ResourceIdentifier.account_id == self.account_id, ResourceIdentifier.resource_type == rtype,
                         ResourceIdentifier.system == system, ResourceIdentifier.value.in_(values[start:start + 500])))
                for r in rows:
                    owners.setdefault((rtype, system, r.value), set()).add((r.resource_id, r.patient_id))
        for key, found in owners.items():
            if len(found) != 1:
                continue
            [(stored_id, stored_patient)] = found
            for new in wanted[key]:
                if new.resource_id == stored_id or (new.resource_type, new.resource_id) in self.state:
                    continue
                # A Patient's "patient" is itself, so only other types must share the patient.
                if new.resource_type != "Patient" and fhir.patient_of(new.resource) != stored_patient:
                    continue
                new.resource_id = stored_id
                new.resource = {**new.resource, "id": stored_id}

    def _content_matches(self, batch: list[tuple[str, NewVersion]]) -> set[tuple[str, str]]:
        """(type, hash) pairs of new resources whose exact content is stored under another id."""
        fresh = [v for _w, v in batch if (v.resource_type, v.resource_id) not in self.state]
        if not fresh:
            return set()
        found: set[tuple[str, str]] = set()
        hashes = list({v.content_hash for v in fresh})
        for start in range(0, len(hashes), CHUNK):
            rows = self._raw_in("SELECT resource_type, content_hash, current FROM resources "
                                "WHERE account_id = {} AND content_hash IN ({})", [self.account_id],
                                hashes[start:start + CHUNK])
            found.update((rtype, digest) for rtype, digest, current in rows if current)
        return found

    # -- the commit ------------------------------------------------------------------------------

    def _finish(self) -> None:
        counts = self.result.counts
        if self.targets:
            provenance = self._provenance()
            write_versions(self.session, self.account_id, [(provenance, 0)], now=self.now, import_id=self.record.id)
            self.record.provenance_id = provenance.resource_id
            self.result.provenance = f"Provenance/{provenance.resource_id}"
        self.record.counts = json.dumps(counts)
        if self.options.validate_only:
            self.session.rollback()
            self.result.import_id = None
            self.result.provenance = None
            return
        if not self.targets and not counts["conflicts"]:
            self.session.rollback()  # nothing changed: leave no trace, not even an empty commit
            self.result.import_id = None
            return
        self.session.commit()
        self.result.committed = True

    def _provenance(self) -> NewVersion:
        resource = {
            "resourceType": "Provenance",
            "id": f"import-{self.record.id}",
            "target": [{"reference": t} for t in self.targets],
            "recorded": self.now.isoformat(timespec="seconds").replace("+00:00", "Z"),
            "activity": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                                     "code": "UPDATE", "display": "revise"}], "text": "$import"},
            "agent": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                                            "code": "assembler"}]},
                       "who": {"display": f"shlhost account {self.account_id}"}}],
            "entity": [{"role": "source", "what": {"display": self.options.source[:500]}}],
        }
        return NewVersion.of(resource, self.options.source)


# -- readers that turn request bodies into items ----------------------------------------------


def ndjson_items(stream: IO[bytes], source: str | None = None) -> Iterator[Item]:
    for number, resource, problems in iter_ndjson_stream(stream, source, MAX_LINE):
        yield (f"{source}, line {number}" if source else f"line {number}"), resource, problems


def bundle_items(fh: IO[bytes]) -> Iterator[Item]:
    """Entries of a Bundle in a file, streamed twice: once to learn what fullUrls and
    conditional references point at, once to yield resources with references rewritten.
    A Bundle that is not valid JSON is refused whole (nothing written)."""
    try:
        yield from _bundle_items(fh)
    except ijson.JSONError as exc:
        raise BadRequest(f"the Bundle is not valid JSON ({str(exc)[:120]})", code="invalid_json") from None


def _bundle_items(fh: IO[bytes]) -> Iterator[Item]:
    full_urls: dict[str, str] = {}
    by_identifier: dict[tuple[str, str, str], str] = {}
    fh.seek(0)
    head = _top_level(fh)
    fh.seek(0)
    if head.get("resourceType") != "Bundle":
        yield from _single_resource(fh)
        return
    for index, entry in enumerate(ijson.items(fh, "entry.item", use_float=True, buf_size=IJSON_BUFFER), start=1):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            continue
        rid = _entry_id(entry, resource, index)
        ref = f"{resource['resourceType']}/{rid}"
        if isinstance(entry.get("fullUrl"), str):
            full_urls[entry["fullUrl"]] = ref
        for system, value in fhir.identifiers(resource):
            by_identifier.setdefault((resource["resourceType"], system, value), rid)

    def fix(reference: str) -> str | None:
        if reference in full_urls:
            return full_urls[reference]
        if "?" in reference:
            rtype, _, query = reference.partition("?")
            for part in query.split("&"):
                name, _, value = part.partition("=")
                if name == "identifier":
                    system, bar, code = value.rpartition("|")
                    rid = by_identifier.get((rtype, system if bar else "", code))
                    if rid:
                        return f"{rtype}/{rid}"
        return None

    fh.seek(0)
    for index, entry in enumerate(ijson.items(fh, "entry.item", use_float=True, buf_size=IJSON_BUFFER), start=1):
        where = f"entry {index}"
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if resource is None:
            yield where, None, [Problem("Bundle entry has no resource", source=where)]
            continue
        request = entry.get("request") if isinstance(entry.get("request"), dict) else {}
        if request.get("method") == "DELETE":
            yield where, None, [Problem("DELETE entries are not applied by $import", severity="warning", source=where)]
            continue
        cleaned, problems = clean_resource(resource, None, where)
        if cleaned is not None:
            cleaned = fhir.rewrite_references({**cleaned, "id": _entry_id(entry, cleaned, index)}, fix)
        yield where, cleaned, problems


def _top_level(fh: IO[bytes]) -> dict[str, Any]:
    """The top-level resourceType, read without parsing the whole file."""
    for prefix, event, value in ijson.parse(fh, buf_size=IJSON_BUFFER):
        if prefix == "resourceType" and event == "string":
            return {"resourceType": value}
    return {}


def _single_resource(fh: IO[bytes]) -> Iterator[Item]:
    try:
        obj = orjson.loads(fh.read())
    except orjson.JSONDecodeError:
        raise BadRequest("the body is not valid JSON", code="invalid_json") from None
    resource, problems = clean_resource(obj, None, "body")
    yield "body", resource, problems


def _entry_id(entry: dict[str, Any], resource: dict[str, Any], index: int) -> str:
    rid = resource.get("id")
    if isinstance(rid, str) and fhir.ID_RE.fullmatch(rid):
        return rid
    full = entry.get("fullUrl")
    if isinstance(full, str) and full.startswith("urn:uuid:") and fhir.ID_RE.fullmatch(full[9:]):
        return full[9:]
    url = (entry.get("request") or {}).get("url") if isinstance(entry.get("request"), dict) else None
    if isinstance(url, str) and "/" in url and "?" not in url:
        tail = url.rsplit("/", 1)[1]
        if fhir.ID_RE.fullmatch(tail):
            return tail
    return fhir.derived_id(resource)


def sphr_items(fileobj: IO[bytes], password: str | None, max_size: int) -> Iterator[Item]:
    """A .sphr: attachments become Binary resources; relative URLs to them are rewritten."""
    sphr = open_sphr(fileobj, password, max_size)
    try:
        base = posixpath.dirname(sphr.phr_names[0])
        binaries: dict[str, str] = {}
        for name in sphr.attachment_names:
            data = sphr.read(name)
            # shlhost's own exports name attachments after their Binary: keep that id.
            stem = posixpath.splitext(posixpath.basename(name))[0]
            own = posixpath.dirname(name) == posixpath.join(base, "attachments").lstrip("/") and fhir.ID_RE.fullmatch(stem)
            bid = stem if own else "att-" + hashlib.sha256(data).hexdigest()[:40]
            binaries[name] = bid
            yield name, {"resourceType": "Binary", "id": bid, "contentType": guess_type(name),
                         "data": base64.b64encode(data).decode("ascii")}, []

        def attach(resource: dict[str, Any]) -> dict[str, Any]:
            for att in attachments_of(resource):
                url = att.get("url")
                if isinstance(url, str) and "://" not in url and not url.startswith(("urn:", "#", "Binary/")):
                    member = posixpath.normpath(posixpath.join(base, url))
                    if member in binaries:
                        att["url"] = f"Binary/{binaries[member]}"
            return resource

        for name in sphr.phr_names:
            for where, resource, problems in ndjson_items(_LineStream(sphr.lines(name)), source=name):
                yield where, attach(resource) if resource else None, problems
    finally:
        sphr.close()


class _LineStream:
    """Adapts an iterator of lines to the ``readline`` that ``capped_lines`` uses."""

    def __init__(self, lines: Iterator[bytes]) -> None:
        self._lines = lines
        self._pending = b""

    def readline(self, limit: int = -1) -> bytes:
        if not self._pending:
            self._pending = next(self._lines, b"")
        if limit < 0 or len(self._pending) <= limit:
            line, self._pending = self._pending, b""
        else:
            line, self._pending = self._pending[:limit], self._pending[limit:]
        return line


def spool(stream: IO[bytes], limit: int) -> IO[bytes]:
    """Copy a request body to a temporary file in chunks, refusing more than ``limit`` bytes."""
    tmp = tempfile.TemporaryFile()
    total = 0
    while True:
        chunk = stream.read(1 << 20)
        if not chunk:
            break
        total += len(chunk)
        if total > limit:
            tmp.close()
            raise PayloadTooLarge(f"the body is larger than the limit of {limit} bytes")
        tmp.write(chunk)
    tmp.seek(0)
    return tmp


def detect_format(content_type: str | None, head: bytes) -> str:
    mime = (content_type or "").split(";")[0].strip().lower()
    if mime in ("application/x-ndjson", "application/fhir+ndjson", "application/ndjson", "application/jsonl"):
        return "ndjson"
    if mime in ("application/zip", "application/x-zip-compressed", "application/x-sphr") or head.startswith(b"PK\x03\x04"):
        return "sphr"
    if mime in ("application/fhir+json", "application/json"):
        return "bundle"
    if mime in ("", "application/octet-stream", "text/plain"):
        stripped = head.lstrip()
        if stripped.startswith(b"{") and b"\n{" in head:
            return "ndjson"
        if stripped.startswith(b"{"):
            return "bundle"
    raise BadRequest(
        "send NDJSON (application/x-ndjson or application/fhir+ndjson), a Bundle (application/fhir+json) "
        "or a .sphr (application/zip)", code="unsupported_media_type")
