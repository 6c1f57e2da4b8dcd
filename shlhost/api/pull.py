"""``POST /api/pull``: import what a SMART Health Link carries into the token's account.

Body ``{"link": "shlink:/...", "passcode": "..."}``; answers the import's OperationOutcome
(the same counts as ``$import``). The link is remembered as a remote (``shlhost pull``).
"""

from __future__ import annotations

from typing import Any

import orjson
from flask import Blueprint, Flask, Response, current_app

from shlhost.api.common import db, json_body, now, runtime
from shlhost.api.fhir import FHIR_JSON, account_id, outcome, record_changed
from shlhost.client import NotALink, ShlClient, ShlError, public_only
from shlhost.errors import BadRequest, ShlhostError
from shlhost.phr import remotes
from shlhost.phr.importer import ImportResult

bp = Blueprint("pull", __name__, url_prefix="/api")


class RemoteFailed(ShlhostError):
    """The remote link could not be resolved: what it answered is in the message."""

    status = 502


@bp.post("/pull")
def pull() -> Response:
    account = account_id()
    body = json_body()
    link, passcode = body.get("link"), body.get("passcode")
    if not isinstance(link, str) or not link:
        raise BadRequest("link (a shlink:/ or viewer URL) is required", code="invalid_link")
    if passcode is not None and not isinstance(passcode, str):
        raise BadRequest("passcode must be a string", code="invalid_passcode")
    config = current_app.config
    private = str(config["PULL_ALLOW_PRIVATE"]).lower() in ("1", "true", "yes")
    client = ShlClient(
        recipient=str(config["PULL_RECIPIENT"]),
        max_wait=10,
        allow_url=None if private else public_only,
    )
    try:
        pulled = remotes.pull(
            db(),
            account,
            link,
            kek=runtime().links.kek,
            client=client,
            now=now(),
            passcode=passcode,
            min_interval=float(config["PULL_MIN_INTERVAL"]),
        )
    except remotes.TooSoon as exc:
        resp = Response(
            orjson.dumps({"error": exc.code, "message": exc.message}),
            status=429,
            mimetype="application/json",
        )
        resp.headers["Retry-After"] = str(exc.extra.get("retry_after", 60))
        return resp
    except NotALink as exc:
        raise BadRequest(exc.message, code="not_a_link") from None
    except ShlError as exc:
        extra: dict[str, Any] = {}
        if getattr(exc, "remaining_attempts", None) is not None:
            extra["remainingAttempts"] = exc.remaining_attempts  # type: ignore[attr-defined]
        raise RemoteFailed(
            f"the link could not be pulled: {exc.message}", code=exc.kind, **extra
        ) from None
    result = pulled.result or ImportResult()
    if result.committed:
        record_changed(account)
    body_out = outcome(result, validate_only=False)
    body_out["issue"][0]["diagnostics"] += (
        f"; files {pulled.files}, unchanged files skipped {pulled.skipped_files}"
    )
    if pulled.cards:
        body_out["issue"].append(
            {
                "severity": "information",
                "code": "informational",
                "diagnostics": "health card signatures: " + ", ".join(pulled.cards),
            }
        )
    return Response(orjson.dumps(body_out), mimetype=FHIR_JSON)


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
