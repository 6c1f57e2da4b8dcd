"""Landing page and health checks."""

from __future__ import annotations

from flask import Blueprint, Flask, Response, current_app, jsonify, render_template
from sqlalchemy import text

from shlhost import __version__
from shlhost.api.common import db, runtime

bp = Blueprint("pages", __name__)


@bp.get("/")
def index() -> str:
    return render_template("index.html", version=__version__)


@bp.get("/healthz")
def healthz() -> Response:
    """The process is up. Says nothing of the database: that is /readyz."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    problems = {}
    try:
        db().execute(text("SELECT 1"))
        db().rollback()
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        problems["database"] = type(exc).__name__
        current_app.logger.warning("not ready: the database is unreachable", exc_info=True)
    try:
        runtime().blobs.ping()  # local: the folder is writable; database: a select; S3: head_bucket
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        problems["blobs"] = type(exc).__name__
        current_app.logger.warning("not ready: the blob store is unreachable", exc_info=True)
    if problems:
        return jsonify({"status": "unavailable", "problems": problems}), 503
    return jsonify({"status": "ready"}), 200


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
