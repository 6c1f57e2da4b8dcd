"""The SMART Health Links data plane, exactly as the spec says.

``POST /shl/<id>`` manifest, ``GET /shl/<id>?recipient=`` for U links,
``GET /shl/<id>/files/<file>?ticket=`` for location URLs. Every answer, errors included,
carries ``Access-Control-Allow-Origin: *``; OPTIONS preflights are answered.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from typing import IO

from flask import Blueprint, Flask, Response, jsonify, request
from werkzeug.wsgi import wrap_file

from shlhost import metrics
from shlhost.api import limits
from shlhost.api.common import json_body, links, now

bp = Blueprint("shl", __name__, url_prefix="/shl")
JOSE = "application/jose"
PIECE = 1 << 16


@bp.post("/<link_id>")
@limits.limit(limits.manifest_limit, key_func=limits.per_link_key)
def manifest(link_id: str) -> Response:
    body = json_body()
    with metrics.manifest_outcome():
        answer = links().manifest(
            link_id,
            recipient=body.get("recipient"),
            passcode=body.get("passcode"),
            embedded_max=body.get("embeddedLengthMax"),
            now=now(),
        )
    return jsonify(answer)


@bp.get("/<link_id>")
@limits.limiter.limit(limits.manifest_limit, key_func=limits.per_link_key)
def direct(link_id: str) -> Response:
    return _stream(links().direct(link_id, recipient=request.args.get("recipient"), now=now()))


@bp.get("/<link_id>/files/<file_id>")
def file(link_id: str, file_id: str) -> Response:
    return _stream(links().fetch_file(link_id, file_id, request.args.get("ticket"), now=now()))


def _stream(blob: IO[bytes]) -> Response:
    """A JWE straight from the blob store, never whole in memory: through the server's file
    wrapper where it has one (gunicorn sends a local file with sendfile), else a piece at a
    time. Either way the blob is closed when the answer ends."""
    size = _remaining(blob)
    body = (
        wrap_file(request.environ, blob, PIECE)
        if "wsgi.file_wrapper" in request.environ
        else _pieces(blob)
    )
    resp = Response(body, mimetype=JOSE, direct_passthrough=True)
    if size is not None:
        resp.content_length = size
    return resp


def _pieces(blob: IO[bytes]) -> Iterator[bytes]:
    with blob:
        while piece := blob.read(PIECE):
            yield piece


def _remaining(blob: IO[bytes]) -> int | None:
    try:
        return os.fstat(blob.fileno()).st_size - blob.tell()
    except (AttributeError, OSError, io.UnsupportedOperation):
        pass
    if isinstance(blob, io.BytesIO):
        return blob.getbuffer().nbytes - blob.tell()
    return None


CORS_HEADERS = (
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
    ("Access-Control-Allow-Headers", "Content-Type"),
    ("Access-Control-Expose-Headers", "Retry-After"),
    ("Access-Control-Max-Age", "86400"),
    ("Cache-Control", "no-store"),
)
_CORS_NAMES = frozenset(name.lower() for name, _ in CORS_HEADERS)


def add_cors(resp: Response) -> Response:
    if request.path.startswith("/shl/"):
        headers = resp.headers
        if _CORS_NAMES.isdisjoint(name.lower() for name, _ in headers.items()):
            headers.extend(CORS_HEADERS)  # one pass, none to replace (the usual case)
        else:
            for name, value in CORS_HEADERS:
                headers[name] = value
    return resp


def init_app(app: Flask) -> None:
    limits.init_app(app)
    app.register_blueprint(bp)
    # App-wide so it also covers 404/405 answers that never reach the blueprint.
    app.after_request(add_cors)
