"""The FHIR endpoints under /fhir: the versioned record store and the PHR operations.

Every route but ``metadata`` and the OperationDefinitions takes
``Authorization: Bearer <API token>`` and sees only the token's account. Errors are
OperationOutcomes (see api/errors.py).
"""

from __future__ import annotations

import tempfile
from typing import Any

import orjson
from flask import Blueprint, Flask, Response, current_app, request

from shlhost import __version__
from shlhost.accounts import account_for_token
from shlhost.api.common import bearer_token, db, json_body, links, now, runtime
from shlhost.errors import BadRequest, NotFound, Unauthorized
from shlhost.phr import definitions, exporter, fhir, sharing
from shlhost.phr.importer import (
    Importer,
    ImportOptions,
    ImportResult,
    bundle_items,
    detect_format,
    ndjson_items,
    sphr_items,
    spool,
)
from shlhost.phr.store import RecordStore, etag, iso, render

bp = Blueprint("fhir", __name__, url_prefix="/fhir")
FHIR_JSON = "application/fhir+json"
COUNTS_URL = "https://shlhost.dev/fhir/StructureDefinition/import-counts"


def fhir_response(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    resp = Response(orjson.dumps(body), status=status, mimetype=FHIR_JSON)
    for key, value in (headers or {}).items():
        resp.headers[key] = value
    return resp


def base_url() -> str:
    return f"{current_app.config['PUBLIC_URL']}/fhir"


def account_id() -> int:
    found = account_for_token(db(), bearer_token())
    if found is None:
        raise Unauthorized("an API token is required: Authorization: Bearer <token>", code="unauthorized")
    return found


def store() -> RecordStore:
    return RecordStore(db(), account_id())


def record_changed(account: int) -> None:
    """Keep the account's long-term links made from its record current. The change itself
    is committed already: a failure here is logged, and the next change tries again."""
    try:
        sharing.refresh_links(links(), runtime().sessions, account, now=now())
    except Exception:  # noqa: BLE001 - must not turn a committed change into an error
        db().rollback()
        current_app.logger.exception("could not refresh the links made from account %s's record", account)


def check_type(rtype: str) -> str:
    if rtype not in fhir.R4_RESOURCE_TYPES:
        raise NotFound(f"{rtype} is not a FHIR R4 resource type", code="unknown_type")
    return rtype


def _count(default: int = 100) -> int:
    raw = request.args.get("_count", str(default))
    if not (raw.isascii() and raw.isdigit()):
        raise BadRequest("_count must be a whole number", code="invalid_count")
    return min(int(raw), 1000)


def _read_headers(row: Any) -> dict[str, str]:
    return {"ETag": etag(row), "Last-Modified": row.last_updated.strftime("%a, %d %b %Y %H:%M:%S GMT"),
            "Content-Location": f"{base_url()}/{row.resource_type}/{row.resource_id}/_history/{row.version_id}"}


def _bundle(kind: str, rows: list[Any], total: int | None = None, *, history: bool = False) -> dict[str, Any]:
    entries = []
    for row in rows:
        entry: dict[str, Any] = {"fullUrl": f"{base_url()}/{row.resource_type}/{row.resource_id}",
                                 "resource": render(row)}
        if history:
            entry["request"] = {"method": "POST" if row.version_id == 1 else "PUT",
                                "url": f"{row.resource_type}/{row.resource_id}"}
            entry["response"] = {"status": "201 Created" if row.version_id == 1 else "200 OK",
                                 "etag": etag(row), "lastModified": iso(row.last_updated)}
        else:
            entry["search"] = {"mode": "match"}
        entries.append(entry)
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": kind, "timestamp": iso(now()),
                              "link": [{"relation": "self", "url": request.url}], "entry": entries}
    if total is not None:
        bundle["total"] = total
    return bundle


# -- public -----------------------------------------------------------------------------


@bp.get("/metadata")
def metadata() -> Response:
    return fhir_response(definitions.capability_statement(base_url(), __version__, iso(now())))


@bp.get("/OperationDefinition/<name>")
def operation_definition(name: str) -> Response:
    found = definitions.operation_definitions(base_url()).get(name)
    if found is None:
        raise NotFound(f"no OperationDefinition {name}")
    return fhir_response(found)


# -- $import ----------------------------------------------------------------------------


def _truthy(name: str) -> bool:
    return request.args.get(name, "").lower() in ("1", "true", "yes")


def outcome(result: ImportResult, *, validate_only: bool) -> dict[str, Any]:
    counts = result.counts
    summary = ", ".join(f"{k} {v}" for k, v in counts.items())
    if validate_only:
        headline = f"validated only, nothing written: would be {summary}"
    elif not result.committed:
        headline = f"nothing changed: {summary}"
    else:
        headline = summary
    issue: dict[str, Any] = {"severity": "information", "code": "informational", "diagnostics": headline}
    if result.provenance:
        issue["details"] = {"text": result.provenance}
    return {
        "resourceType": "OperationOutcome",
        "extension": [{"url": COUNTS_URL, "extension": [{"url": k, "valueInteger": v} for k, v in counts.items()]}],
        "issue": [issue, *result.issues],
    }


@bp.post("/Bundle/$import")
def import_() -> Response:
    account = account_id()
    mode = request.args.get("mode", "commit")
    if mode not in ("commit", "validate"):
        raise BadRequest("mode must be commit or validate", code="invalid_mode")
    limit = int(current_app.config["MAX_CONTENT_LENGTH"])
    body = spool(request.stream, limit)
    with body:
        head = body.read(4096)
        if not head.strip():
            raise BadRequest("the body is empty: send NDJSON, a Bundle or a .sphr", code="empty_body")
        body.seek(0)
        fmt = detect_format(request.content_type, head)
        options = ImportOptions(
            source=request.args.get("source") or "unspecified",
            strategy=request.args.get("strategy", "merge"),
            validate_only=mode == "validate",
            strict=_truthy("strict"),
            format=fmt,
        )
        if fmt == "ndjson":
            items = ndjson_items(body)
        elif fmt == "bundle":
            items = bundle_items(body)
        else:
            items = sphr_items(body, request.headers.get("X-SPHR-Password"), limit * 20)
        result = Importer(db(), account, options, now=now()).run(items)
    if result.committed:
        record_changed(account)
    return fhir_response(outcome(result, validate_only=options.validate_only))


# -- $phr-export ------------------------------------------------------------------------


@bp.get("/Bundle/$phr-export")
def phr_export() -> Response:
    account = account_id()
    fmt = request.args.get("outputFormat", "bundle")
    if fmt not in exporter.FORMATS:
        raise BadRequest(f"outputFormat must be one of {', '.join(exporter.FORMATS)}", code="invalid_format")
    selection = exporter.Selection.parse(
        patient=request.args.get("patient"), types=request.args.get("_type"), start=request.args.get("start"),
        end=request.args.get("end"), since=request.args.get("_since"))
    records = RecordStore(db(), account)
    if selection.patient and records.current("Patient", selection.patient) is None:
        raise NotFound(f"Patient/{selection.patient} is not in this record")
    name = exporter.safe_filename(selection.patient or records.only_patient() or "record")
    db().rollback()  # the export reads in its own short transactions
    export = exporter.Exporter(runtime().sessions, account, selection)
    headers = {"X-PHR-Version": "1.0", "Cache-Control": "no-store"}
    if fmt == "bundle":
        return Response(export.bundle(), mimetype=FHIR_JSON, headers=headers)
    if fmt in ("ndjson", "phr"):
        headers["Content-Disposition"] = f'attachment; filename="{name}.{fmt}"'
        return Response(export.ndjson(cover=fmt == "phr"), mimetype="application/x-ndjson", headers=headers)
    password = request.headers.get("X-SPHR-Password", "")
    body = tempfile.TemporaryFile()
    try:
        export.sphr(body, password, name)
    except BaseException:
        body.close()
        raise
    body.seek(0)
    headers["Content-Disposition"] = f'attachment; filename="{name}.sphr"'
    return Response(_file_chunks(body), mimetype="application/zip", headers=headers)


def _file_chunks(fh: Any) -> Any:
    with fh:
        while chunk := fh.read(1 << 16):
            yield chunk


# -- conflicts --------------------------------------------------------------------------


def _conflict_parameters(records: RecordStore, found: Any) -> dict[str, Any]:
    stored = records.vread(found.resource_type, found.resource_id, str(found.stored_version))
    current = records.current(found.resource_type, found.resource_id)
    parts: list[dict[str, Any]] = [
        {"name": "id", "valueString": str(found.id)},
        {"name": "target", "valueString": f"{found.resource_type}/{found.resource_id}"},
        {"name": "stored", "resource": render(stored)},
        {"name": "storedSource", "valueString": stored.source or "unspecified"},
        {"name": "incoming", "resource": {**orjson.loads(found.incoming_content), "id": found.resource_id}},
        {"name": "incomingSource", "valueString": found.incoming_source or "unspecified"},
        {"name": "detected", "valueInstant": iso(found.created_at)},
        {"name": "currentVersion", "valueString": str(current.version_id) if current else "none"},
    ]
    if found.resolved_at:
        parts += [{"name": "resolution", "valueCode": found.resolution},
                  {"name": "resolved", "valueInstant": iso(found.resolved_at)}]
    return {"resourceType": "Parameters", "id": f"conflict-{found.id}", "parameter": parts}


@bp.get("/$conflicts")
def conflicts() -> Response:
    records = store()
    found = records.conflicts(include_resolved=_truthy("all"))
    entries = [{"resource": _conflict_parameters(records, c)} for c in found]
    return fhir_response({"resourceType": "Bundle", "type": "collection", "total": len(entries),
                          "timestamp": iso(now()), "entry": entries})


@bp.post("/$conflicts/<int:conflict_id>/$resolve")
def resolve(conflict_id: int) -> Response:
    records = store()
    body = request.get_json(silent=True) or {}
    choice = body.get("resolution") if isinstance(body, dict) else None
    choice = choice or request.args.get("resolution")
    records.resolve(conflict_id, str(choice or ""), now=now())
    record_changed(records.account_id)
    return fhir_response(_conflict_parameters(records, records.conflict(conflict_id)))


# -- read, vread, history, search, update, revert ------------------------------------------


@bp.get("/<rtype>")
def search(rtype: str) -> Response:
    check_type(rtype)
    offset = request.args.get("_offset", "0")
    rows, total = store().search(rtype, patient=request.args.get("patient") or None, count=_count(),
                                 offset=min(int(offset), 2**31) if offset.isascii() and offset.isdigit() else 0)
    return fhir_response(_bundle("searchset", rows, total))


@bp.get("/<rtype>/_history")
def history_type(rtype: str) -> Response:
    check_type(rtype)
    since = request.args.get("_since")
    when = fhir.parse_instant(since) if since else None
    rows = store().history_type(rtype, since=when, count=_count())
    return fhir_response(_bundle("history", rows, len(rows), history=True))


@bp.get("/<rtype>/<rid>")
def read(rtype: str, rid: str) -> Response:
    row = store().read(check_type(rtype), rid)
    return fhir_response(render(row), headers=_read_headers(row))


@bp.put("/<rtype>/<rid>")
def update(rtype: str, rid: str) -> Response:
    check_type(rtype)
    row, changed = store().update(rtype, rid, json_body(), if_match=request.headers.get("If-Match"),
                                  source=request.args.get("source"), now=now())
    if changed:
        record_changed(row.account_id)
    status = 201 if changed and row.version_id == 1 else 200
    return fhir_response(render(row), status, _read_headers(row))


@bp.get("/<rtype>/<rid>/_history")
def history(rtype: str, rid: str) -> Response:
    rows = store().history(check_type(rtype), rid)
    return fhir_response(_bundle("history", rows, len(rows), history=True))


@bp.get("/<rtype>/<rid>/_history/<vid>")
def vread(rtype: str, rid: str, vid: str) -> Response:
    row = store().vread(check_type(rtype), rid, vid)
    return fhir_response(render(row), headers=_read_headers(row))


@bp.post("/<rtype>/<rid>/$revert")
def revert(rtype: str, rid: str) -> Response:
    version = request.args.get("version", "")
    row = store().revert(check_type(rtype), rid, version, now=now())
    record_changed(row.account_id)
    return fhir_response(render(row), headers=_read_headers(row))


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
