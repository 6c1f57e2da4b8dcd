"""For pharmacies and other systems: paste a SMART Health Link (or scan its QR code) and
save what it carries into the signed-in account's record, with the link as provenance.

The same pull as ``POST /api/pull`` and ``shlhost pull``: the link becomes a remote of the
account, so an L link can be pulled again later and brings only what changed.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Flask, current_app, redirect, render_template, request, session, url_for

from shlhost.api.common import db, now, runtime
from shlhost.client import NotALink, ShlClient, ShlError, public_only
from shlhost.phr import remotes
from shlhost.web import patient

bp = Blueprint("receive", __name__, url_prefix="/patient/receive")
bp.before_request(patient._check_csrf)  # the patient pages' CSRF check, on every POST here


@bp.get("/")
@patient.signed_in
def form() -> str:
    return render_template("patient/receive.html", error=None, link="")


@bp.post("/")
@patient.signed_in
def receive() -> Any:
    account = patient.account_id()
    link = (request.form.get("link") or "").strip()
    passcode = request.form.get("passcode") or None
    config = current_app.config
    private = str(config["PULL_ALLOW_PRIVATE"]).lower() in ("1", "true", "yes")
    client = ShlClient(recipient=str(config["PULL_RECIPIENT"]), max_wait=10,
                       allow_url=None if private else public_only)
    try:
        pulled = remotes.pull(db(), account, link, kek=runtime().links.kek, client=client, now=now(),
                              passcode=passcode, min_interval=float(config["PULL_MIN_INTERVAL"]))
    except remotes.TooSoon as exc:
        return render_template("patient/receive.html", error=exc.message, link=link), 429
    except NotALink:
        return render_template("patient/receive.html", link=link,
                               error="That is not a SMART Health Link (it should contain shlink:/)."), 400
    except ShlError as exc:
        attempts = getattr(exc, "remaining_attempts", None)
        message = f"The link could not be read: {exc.message}"
        if attempts is not None:
            message += f" ({attempts} attempts left)"
        return render_template("patient/receive.html", error=message, link=link), 400
    result = pulled.result
    if result is not None and result.committed:
        patient.record_changed(account)
    counts = result.counts if result is not None else {}
    session["last_import"] = {
        "source": "a shared link",
        "format": f"{pulled.files} file(s)",
        "committed": bool(result and result.committed),
        "counts": counts,
        "issues": [str(i.get("diagnostics", ""))[:300] for i in (result.issues[:10] if result else [])],
    }
    return redirect(url_for("patient.import_summary"), 303)


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
