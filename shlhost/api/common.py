"""Per-request plumbing: the database session, the services, the clock, bearer tokens."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flask import Flask, current_app, g, request
from sqlalchemy.orm import Session

from shlhost import Runtime
from shlhost.errors import BadRequest
from shlhost.shl.links import LinkService


def runtime() -> Runtime:
    rt: Runtime = current_app.extensions["shlhost"]
    return rt


def db() -> Session:
    if "db" not in g:
        g.db = runtime().sessions()
    session: Session = g.db
    return session


def links() -> LinkService:
    rt = runtime()
    return LinkService(db, rt.blobs, rt.links, rt.uses, rt.link_cache)


def now() -> datetime:
    return datetime.now(UTC)


def bearer_token() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def json_body() -> dict[str, Any]:
    """The request body as a JSON object, or a clear 400 (bad syntax, bad UTF-8, too deep)."""
    try:
        body = request.get_json(silent=True, force=True)
    except RecursionError:
        body = None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object", code="invalid_json")
    return body


def init_app(app: Flask) -> None:
    @app.teardown_appcontext
    def _close_session(_exc: BaseException | None) -> None:
        session: Any = g.pop("db", None)
        # A session that never began a transaction nor held an object has nothing to
        # close (the manifest's runs on a RawTransaction); closing costs ~15 us anyway.
        if session is not None and (
            session.in_transaction() or len(session.identity_map) or session.new
        ):
            session.close()
