"""Patient pages under ``/patient``: an account, its record, its conflicts and its links.

Sign-in is a Flask session cookie (HttpOnly, SameSite=Lax, Secure whenever the request
came over HTTPS). Every POST carries the session's CSRF token; a wrong or missing token is
a 400 page. Everything a page shows or changes is looked up through the signed-in account:
another account's link or conflict answers the same 404 as one that does not exist.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
from collections.abc import Callable
from datetime import date, timedelta
from functools import wraps
from typing import Any

import orjson
from flask import (
    Blueprint,
    Flask,
    Response,
    current_app,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.sessions import SecureCookieSessionInterface
from werkzeug.wrappers import Response as WerkzeugResponse

from shlhost import qr
from shlhost.accounts import check_password, create_account
from shlhost.api import limits
from shlhost.api.common import db, links, now, runtime
from shlhost.errors import BadRequest, NotFound, ShlhostError
from shlhost.phr import sharing
from shlhost.phr.importer import (
    Importer,
    ImportOptions,
    bundle_items,
    detect_format,
    ndjson_items,
    sphr_items,
    spool,
)
from shlhost.phr.store import RecordStore, render
from shlhost.shl.links import LinkOptions, LinkService
from shlhost.storage.models import Link

bp = Blueprint("patient", __name__, url_prefix="/patient")

CSRF_FIELD = "csrf_token"
SIGNIN_LIMIT_DEFAULT = "10 per minute"
ISSUES_SHOWN = 10
DB_INT_MAX = 2**31 - 1

STATE_LABELS = {
    "active": "Active",
    "paused": "Paused",
    "expired": "Expired",
    "used_up": "Used up",
    "revoked": "Revoked",
    "locked": "Locked (too many wrong passcodes)",
}
OUTCOME_LABELS = {
    "ok": "Opened",
    "wrong_passcode": "Wrong passcode",
    "locked": "Locked",
    "dead": "Refused (not live)",
    "revoked": "Refused (revoked)",
    "paused": "Refused (paused)",
    "expired": "Refused (expired)",
    "used_up": "Refused (used up)",
}
SHAREABLE_TYPES = (
    ("Condition", "Problems"),
    ("MedicationStatement", "Medications"),
    ("MedicationRequest", "Prescriptions"),
    ("AllergyIntolerance", "Allergies"),
    ("Immunization", "Immunizations"),
    ("Observation", "Results"),
    ("DiagnosticReport", "Reports"),
    ("Procedure", "Procedures"),
    ("Encounter", "Visits"),
)
EXPIRY_CHOICES = (
    ("1", "1 day"),
    ("7", "1 week"),
    ("30", "30 days"),
    ("365", "1 year"),
    ("", "Never"),
)


class SessionInterface(SecureCookieSessionInterface):
    """The session cookie is Secure whenever the request itself came over HTTPS."""

    def get_cookie_secure(self, app: Flask) -> bool:
        return bool(app.config["SESSION_COOKIE_SECURE"]) or (
            request.is_secure if request else False
        )


# -- session, CSRF, sign-in ------------------------------------------------------------------


def csrf_token() -> str:
    token = session.get("csrf")
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        session["csrf"] = token
    return token


@bp.before_request
def _check_csrf() -> None:
    if request.method in ("POST", "PUT", "PATCH", "DELETE"):
        sent = request.form.get(CSRF_FIELD) or request.headers.get("X-CSRF-Token") or ""
        expected = session.get("csrf")
        if not isinstance(expected, str) or not hmac.compare_digest(
            sent.encode(), expected.encode()
        ):
            raise BadRequest(
                "This form has expired or did not come from this site. Go back, reload the "
                "page and try again.",
                code="csrf_failed",
            )


@bp.after_request
def _no_store(resp: Response) -> Response:
    resp.headers["Cache-Control"] = "no-store"
    return resp


@bp.app_context_processor
def _template_globals() -> dict[str, Any]:
    return {
        "csrf_token": csrf_token,
        "signed_in_email": session.get("email") if "account_id" in session else None,
    }


def account_id() -> int:
    found = session.get("account_id")
    if not isinstance(found, int):
        raise NotFound("Not signed in.")  # signed_in() redirects before this
    return found


def signed_in(view: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not isinstance(session.get("account_id"), int):
            if request.method == "GET":
                return redirect(url_for("patient.signin", next=request.full_path.rstrip("?")))
            return redirect(url_for("patient.signin"))
        return view(*args, **kwargs)

    return wrapper


def _start_session(account: Any) -> None:
    """A fresh session on every sign-in (no fixation): old contents and token are dropped."""
    session.clear()
    session["account_id"] = int(account.id)
    session["email"] = account.email
    session["csrf"] = secrets.token_urlsafe(32)


def _safe_next(raw: str | None) -> str:
    if raw and raw.startswith("/patient") and not raw.startswith("//") and "\\" not in raw:
        return raw
    return url_for("patient.record")


def signin_limit() -> str:
    return str(current_app.config.get("RATELIMIT_SIGNIN", SIGNIN_LIMIT_DEFAULT))


@bp.route("/signup", methods=["GET", "POST"])
@limits.limiter.limit(signin_limit, methods=["POST"])
def signup() -> Any:
    error = None
    email = ""
    if request.method == "POST":
        email = request.form.get("email", "")
        password = request.form.get("password", "")
        if password != request.form.get("password2", ""):
            error = "The two passwords differ."
        else:
            try:
                account = create_account(db(), runtime().hasher, email, password, now=now())
            except ShlhostError as exc:
                db().rollback()
                error = exc.message[:1].upper() + exc.message[1:] + "."
            else:
                _start_session(account)
                return redirect(url_for("patient.record"), 303)
    status = 400 if error else 200
    return render_template("patient/signup.html", error=error, email=email), status


@bp.route("/signin", methods=["GET", "POST"])
@limits.limiter.limit(signin_limit, methods=["POST"])
def signin() -> Any:
    error = None
    email = ""
    if request.method == "POST":
        email = request.form.get("email", "")
        account = check_password(db(), runtime().hasher, email, request.form.get("password", ""))
        if account is None:
            error = "That email and password do not match an account."
        else:
            _start_session(account)
            return redirect(_safe_next(request.args.get("next")), 303)
    status = 401 if error else 200
    return render_template(
        "patient/signin.html", error=error, email=email, next=request.args.get("next", "")
    ), status


@bp.post("/signout")
def signout() -> WerkzeugResponse:
    session.clear()
    return redirect(url_for("patient.signin", signed_out=1), 303)


# -- the record -------------------------------------------------------------------------------


def concept(value: Any) -> str:
    """A CodeableConcept (or Reference) as a person would read it."""
    if not isinstance(value, dict):
        return ""
    if value.get("text"):
        return str(value["text"])
    for coding in value.get("coding") or []:
        if isinstance(coding, dict) and (coding.get("display") or coding.get("code")):
            return str(coding.get("display") or coding.get("code"))
    return str(value.get("display") or "")


def status_of(value: Any) -> str:
    return concept(value) if isinstance(value, dict) else str(value or "")


def human_name(resource: dict[str, Any]) -> str:
    for name in resource.get("name") or []:
        if not isinstance(name, dict):
            continue
        if name.get("text"):
            return str(name["text"])
        parts = [*(name.get("given") or []), name.get("family") or ""]
        text = " ".join(str(p) for p in parts if p)
        if text:
            return text
    return "(no name)"


def quantity(resource: dict[str, Any]) -> str:
    value = resource.get("valueQuantity")
    if isinstance(value, dict) and "value" in value:
        return f"{value.get('value')} {value.get('unit') or value.get('code') or ''}".strip()
    for key in ("valueString", "valueInteger", "valueBoolean", "valueDateTime"):
        if key in resource:
            return str(resource[key])
    if isinstance(resource.get("valueCodeableConcept"), dict):
        return concept(resource["valueCodeableConcept"])
    parts = []
    for comp in resource.get("component") or []:
        if isinstance(comp, dict):
            parts.append(f"{concept(comp.get('code'))}: {quantity(comp)}")
    return "; ".join(parts)


def first(resource: dict[str, Any], *keys: str) -> str:
    for key in keys:
        value = resource.get(key)
        if isinstance(value, str) and value:
            return value
        if isinstance(value, dict):
            found = value.get("start") or value.get("end")
            if found:
                return str(found)
    return ""


def describe_resource(resource: dict[str, Any]) -> str:
    """One line for the timeline."""
    rtype = resource.get("resourceType")
    if rtype in ("MedicationStatement", "MedicationRequest"):
        return concept(resource.get("medicationCodeableConcept")) or concept(
            resource.get("medicationReference")
        )
    if rtype == "Immunization":
        return concept(resource.get("vaccineCode"))
    if rtype == "Observation":
        value = quantity(resource)
        return (
            f"{concept(resource.get('code'))}: {value}" if value else concept(resource.get("code"))
        )
    if rtype == "Encounter":
        types = resource.get("type") or []
        return concept(types[0]) if types else concept(resource.get("class")) or "Visit"
    return concept(resource.get("code")) or rtype or ""


TYPE_LABELS = dict(SHAREABLE_TYPES) | {"Patient": "Patient"}
TIMELINE_TYPES = (
    "Condition",
    "MedicationStatement",
    "MedicationRequest",
    "AllergyIntolerance",
    "Immunization",
    "Observation",
    "DiagnosticReport",
    "Procedure",
    "Encounter",
)


def _resources(records: RecordStore, rtype: str) -> list[dict[str, Any]]:
    rows, _total = records.search(rtype, count=1000)
    out = []
    for row in rows:
        resource = render(row)
        resource["_clinical_date"] = row.clinical_date or ""
        out.append(resource)
    return out


def record_view(account: int) -> dict[str, Any]:
    records = RecordStore(db(), account)
    found = {rtype: _resources(records, rtype) for rtype in ("Patient", *TIMELINE_TYPES)}
    by_date = lambda r: r.get("_clinical_date") or ""  # noqa: E731
    timeline = sorted(
        (r for t in TIMELINE_TYPES for r in found[t] if r.get("_clinical_date")),
        key=by_date,
        reverse=True,
    )
    meds = sorted(
        found["MedicationStatement"] + found["MedicationRequest"], key=by_date, reverse=True
    )
    return {
        "patients": found["Patient"],
        "problems": sorted(found["Condition"], key=by_date, reverse=True),
        "medications": meds,
        "allergies": found["AllergyIntolerance"],
        "immunizations": sorted(found["Immunization"], key=by_date, reverse=True),
        "results": sorted(found["Observation"], key=by_date, reverse=True),
        "timeline": timeline[:200],
        "total": sum(len(v) for v in found.values()),
        "conflicts": len(records.conflicts()),
    }


@bp.get("/")
@signed_in
def record() -> str:
    view = record_view(account_id())
    db().rollback()
    return render_template(
        "patient/record.html",
        view=view,
        concept=concept,
        status_of=status_of,
        human_name=human_name,
        quantity=quantity,
        first=first,
        describe=describe_resource,
        type_labels=TYPE_LABELS,
    )


def record_changed(account: int) -> None:
    """Keep the long-term links made from the record current (as api/fhir.py does)."""
    try:
        sharing.refresh_links(links(), runtime().sessions, account, now=now())
    except Exception:  # noqa: BLE001 - the change is committed; the next one tries again
        db().rollback()
        current_app.logger.exception(
            "could not refresh the links made from account %s's record", account
        )


def _format_for(filename: str, head: bytes) -> str:
    ext = os.path.splitext(filename.lower())[1]
    if ext == ".sphr" or head.startswith(b"PK\x03\x04"):
        return "sphr"
    if ext in (".phr", ".ndjson", ".jsonl"):
        return "ndjson"
    return detect_format(None, head)


def _wants_json() -> bool:
    return request.headers.get("X-Requested-With") == "XMLHttpRequest"


@bp.post("/upload")
@signed_in
def upload() -> Any:
    account = account_id()
    upload_file = request.files.get("file")
    if upload_file is None or not upload_file.filename:
        raise BadRequest("Choose a file to upload.", code="no_file")
    name = os.path.basename(upload_file.filename.replace("\\", "/"))[:200] or "upload"
    limit = int(current_app.config["MAX_CONTENT_LENGTH"])
    with spool(upload_file.stream, limit) as body:
        head = body.read(4096)
        if not head.strip():
            raise BadRequest("The file is empty.", code="empty_body")
        body.seek(0)
        fmt = _format_for(name, head)
        options = ImportOptions(source=name, format=fmt)
        if fmt == "ndjson":
            items = ndjson_items(body)
        elif fmt == "bundle":
            items = bundle_items(body)
        else:
            items = sphr_items(body, request.form.get("sphr_password") or None, limit * 20)
        result = Importer(db(), account, options, now=now()).run(items)
    if result.committed:
        record_changed(account)
    session["last_import"] = {
        "source": name,
        "format": fmt,
        "committed": result.committed,
        "counts": result.counts,
        "issues": [str(i.get("diagnostics", ""))[:300] for i in result.issues[:ISSUES_SHOWN]],
    }
    target = url_for("patient.import_summary")
    if _wants_json():
        return jsonify({"redirect": target})
    return redirect(target, 303)


@bp.get("/import")
@signed_in
def import_summary() -> Any:
    summary = session.get("last_import")
    if not summary:
        return redirect(url_for("patient.record"))
    return render_template("patient/import.html", summary=summary)


# -- conflicts --------------------------------------------------------------------------------


def _pretty(resource: dict[str, Any]) -> str:
    return orjson.dumps(resource, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()


@bp.get("/conflicts")
@signed_in
def conflicts() -> str:
    records = RecordStore(db(), account_id())
    shown = []
    for found in records.conflicts():
        stored = records.vread(found.resource_type, found.resource_id, str(found.stored_version))
        incoming = {**orjson.loads(found.incoming_content), "id": found.resource_id}
        shown.append(
            {
                "id": found.id,
                "target": f"{found.resource_type}/{found.resource_id}",
                "title": describe_resource(incoming) or describe_resource(render(stored)),
                "stored": _pretty(render(stored)),
                "stored_source": stored.source or "unspecified",
                "incoming": _pretty(incoming),
                "incoming_source": found.incoming_source or "unspecified",
                "detected": found.created_at,
            }
        )
    db().rollback()
    return render_template("patient/conflicts.html", conflicts=shown)


@bp.post("/conflicts/<int:conflict_id>")
@signed_in
def resolve(conflict_id: int) -> WerkzeugResponse:
    if conflict_id > DB_INT_MAX:  # past any database integer: no such conflict, not a 500
        raise NotFound("No such conflict.")
    records = RecordStore(db(), account_id())
    records.resolve(conflict_id, request.form.get("resolution", ""), now=now())  # 404 if not ours
    record_changed(records.account_id)
    return redirect(url_for("patient.conflicts", resolved=conflict_id), 303)


# -- sharing ----------------------------------------------------------------------------------


def _share_query(form: Any) -> dict[str, Any]:
    scope = form.get("scope", "all")
    raw: dict[str, Any] = {}
    if scope == "summary":
        raw["summary"] = True
    elif scope == "range":
        if not form.get("start") and not form.get("end"):
            raise BadRequest(
                "A date range needs a start or an end date.", code="invalid_record_query"
            )
        raw["start"] = form.get("start") or None
        raw["end"] = form.get("end") or None
    elif scope == "types":
        chosen = [t for t in form.getlist("types") if t in dict(SHAREABLE_TYPES)]
        if not chosen:
            raise BadRequest(
                "Choose at least one kind of data to share.", code="invalid_record_query"
            )
        raw["types"] = ["Patient", *chosen]
    elif scope != "all":
        raise BadRequest("Choose what to share.", code="invalid_record_query")
    return sharing.normalise_query(raw)


def _share_options(form: Any) -> LinkOptions:
    days = form.get("expires", "")
    exp = None
    if days:
        if not days.isdigit() or not 1 <= int(days) <= 3660:
            raise BadRequest("Choose an expiry.", code="invalid_exp")
        exp = (now() + timedelta(days=int(days))).replace(microsecond=0)
    uses = form.get("uses", "any")
    max_uses: Any = None
    if uses == "single":
        max_uses = 1
    elif uses == "n":
        max_uses = form.get("max_uses", "")
        if not str(max_uses).isdigit() or int(max_uses) < 1:
            raise BadRequest(
                "The number of uses must be a whole number of at least 1.", code="invalid_max_uses"
            )
    return LinkOptions(
        label=form.get("label") or None,
        passcode=form.get("passcode") or None,
        exp=exp,
        flags="L" if form.get("long_term") else "",
        max_uses=max_uses,
    )


@bp.route("/share", methods=["GET", "POST"])
@signed_in
def share() -> Any:
    account = account_id()
    error = None
    if request.method == "POST":
        try:
            query = _share_query(request.form)
            options = _share_options(request.form)
            db().rollback()  # the export reads in its own transactions
            file = sharing.record_file(runtime().sessions, account, query)
            created = links().create(
                [file], options, now=now(), account_id=account, record_query=json.dumps(query)
            )
        except BadRequest as exc:
            db().rollback()
            error = exc.message[:1].upper() + exc.message[1:]
        else:
            return redirect(url_for("patient.link", link_id=created.link.id, created=1), 303)
    return render_template(
        "patient/share.html",
        error=error,
        form=request.form,
        types=SHAREABLE_TYPES,
        expiries=EXPIRY_CHOICES,
        today=date.today().isoformat(),
    ), 400 if error else 200


# -- links ------------------------------------------------------------------------------------


def my_link(link_id: str) -> tuple[LinkService, Link]:
    """The signed-in account's link; anything else is the same 404."""
    service = links()
    link = service.session.get(Link, link_id) if len(link_id) <= 64 else None
    if link is None or link.account_id is None or link.account_id != account_id():
        raise NotFound("No such link in your account.")
    return service, link


def _link_view(service: LinkService, link: Link) -> dict[str, Any]:
    moment = now()
    info = service.describe(link, moment)
    info["state"] = STATE_LABELS.get(info["status"], info["status"])
    info["accesses"] = [
        {**a, "outcome_label": OUTCOME_LABELS.get(a["outcome"], a["outcome"])}
        for a in service.accesses(link)
    ]
    info["exp_text"] = link.exp.strftime("%Y-%m-%d %H:%M UTC") if link.exp else "never"
    info["created_text"] = link.created_at.strftime("%Y-%m-%d %H:%M UTC")
    query = info.get("from_record") or {}
    if query.get("summary"):
        info["what"] = "Emergency summary"
    elif query.get("types"):
        info["what"] = ", ".join(
            TYPE_LABELS.get(t, t) for t in str(query["types"]).split(",") if t != "Patient"
        )
    elif query.get("start") or query.get("end"):
        info["what"] = f"From {query.get('start') or 'the start'} to {query.get('end') or 'today'}"
    else:
        info["what"] = "Whole record"
    return info


@bp.get("/links")
@signed_in
def links_page() -> str:
    service = links()
    shown = [_link_view(service, link) for link in service.list_links(account_id())]
    db().rollback()
    return render_template("patient/links.html", links=shown)


@bp.get("/links/<link_id>")
@signed_in
def link(link_id: str) -> str:
    service, found = my_link(link_id)
    info = _link_view(service, found)
    info["viewer_link"] = service.shlink(found, viewer=True) if found.revoked_at is None else None
    db().rollback()
    return render_template(
        "patient/link.html", link=info, created=request.args.get("created") == "1"
    )


def _qr_text(link_id: str) -> str:
    service, found = my_link(link_id)
    text = service.shlink(found, viewer=True) if found.revoked_at is None else None
    if text is None:
        raise NotFound("This link is revoked: it has no QR code any more.")
    return text


@bp.get("/links/<link_id>/qr.png")
@signed_in
def qr_png(link_id: str) -> Response:
    resp = Response(qr.png(_qr_text(link_id)), mimetype="image/png")
    if request.args.get("download"):
        resp.headers["Content-Disposition"] = 'attachment; filename="health-link-qr.png"'
    return resp


@bp.get("/links/<link_id>/qr.svg")
@signed_in
def qr_svg(link_id: str) -> Response:
    resp = Response(qr.svg(_qr_text(link_id), title="SMART Health Link"), mimetype="image/svg+xml")
    if request.args.get("download"):
        resp.headers["Content-Disposition"] = 'attachment; filename="health-link-qr.svg"'
    return resp


ACTIONS = ("pause", "resume", "revoke", "extend", "passcode")


@bp.post("/links/<link_id>/<action>")
@signed_in
def link_action(link_id: str, action: str) -> WerkzeugResponse:
    if action not in ACTIONS:
        raise NotFound("No such action.")
    service, found = my_link(link_id)
    moment = now()
    if action == "revoke":
        if request.form.get("confirm") != "1":
            raise BadRequest(
                "Tick the box to confirm: a revoked link cannot be brought back.",
                code="unconfirmed",
            )
        service.revoke(found, now=moment)
    elif action == "pause":
        service.update(found, {"active": False}, now=moment)
    elif action == "resume":
        service.update(found, {"active": True}, now=moment)
    elif action == "extend":
        days = request.form.get("days", "")
        if not days.isdigit() or not 1 <= int(days) <= 3660:
            raise BadRequest("Choose how many days to extend the link by.", code="invalid_exp")
        base = found.exp if found.exp and found.exp > moment else moment
        service.update(found, {"exp": (base + timedelta(days=int(days))).isoformat()}, now=moment)
    else:
        passcode = request.form.get("passcode", "")
        if not passcode:
            raise BadRequest("Type the new passcode.", code="invalid_passcode")
        service.update(found, {"passcode": passcode}, now=moment)
    back = request.form.get("back")
    if back == "list":
        return redirect(url_for("patient.links_page") + f"#link-{link_id}", 303)
    return redirect(url_for("patient.link", link_id=link_id, done=action), 303)


def init_app(app: Flask) -> None:
    app.config.setdefault("SESSION_COOKIE_HTTPONLY", True)
    app.config["SESSION_COOKIE_SAMESITE"] = app.config.get("SESSION_COOKIE_SAMESITE") or "Lax"
    app.config.setdefault("RATELIMIT_SIGNIN", SIGNIN_LIMIT_DEFAULT)
    app.session_interface = SessionInterface()
    app.register_blueprint(bp)
