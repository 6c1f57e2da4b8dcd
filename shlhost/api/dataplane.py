"""The SMART Health Links data plane, exactly as the spec says.

``POST /shl/<id>`` manifest, ``GET /shl/<id>?recipient=`` for U links,
``GET /shl/<id>/files/<file>?ticket=`` for location URLs. Every answer, errors included,
carries ``Access-Control-Allow-Origin: *``; OPTIONS preflights are answered.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from typing import IO, Any

import orjson
from flask import Blueprint, Flask, Response, request
from werkzeug.wsgi import wrap_file

from shlhost import metrics
from shlhost.api import limits
from shlhost.api.common import json_body, links, now
from shlhost.errors import DeadLink, WrongPasscode

bp = Blueprint("shl", __name__, url_prefix="/shl")
JOSE = "application/jose"
PIECE = 1 << 16


@bp.post("/<link_id>")
@limits.limit(limits.manifest_limit, key_func=limits.per_link_key)
def manifest(link_id: str) -> Response:
    body = _manifest_request()
    try:
        answer = links().manifest(
            link_id,
            recipient=body.get("recipient"),
            passcode=body.get("passcode"),
            embedded_max=body.get("embeddedLengthMax"),
            now=now(),
        )
    except WrongPasscode:
        metrics.MANIFEST_OUTCOMES["wrong_passcode"].inc()
        raise
    except DeadLink:
        metrics.MANIFEST_OUTCOMES["dead"].inc()
        raise
    metrics.MANIFEST_OUTCOMES["ok"].inc()
    return _json(answer)


# The manifest's JSON in and out through orjson: about a tenth of the manifest's time went to
# the standard library's json and Flask's provider (profiled under gunicorn).


def _manifest_request() -> dict[str, Any]:
    """The request's JSON object. A body orjson does not read as an object goes to the
    general parser, which decides and words the error: both accept the same bodies."""
    try:
        body = orjson.loads(request.get_data(cache=True))
    except orjson.JSONDecodeError:
        return json_body()
    return body if isinstance(body, dict) else json_body()


def _json(answer: dict[str, Any]) -> Response:
    """``jsonify(answer)`` byte for byte (sorted keys, compact, a final newline) for the
    ASCII a manifest holds."""
    return Response(
        orjson.dumps(answer, option=orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE),
        mimetype="application/json",
    )


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
