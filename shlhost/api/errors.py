"""One place that turns errors into answers: JSON for APIs, OperationOutcome under /fhir,
a readable page elsewhere. Unexpected errors are logged with the request id; the client
gets no internals."""

from __future__ import annotations

from typing import Any

from flask import Flask, Response, g, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

from shlhost.errors import ShlhostError, WrongPasscode

JSON_PREFIXES = ("/api/", "/shl/", "/healthz", "/readyz")


def wants_json() -> bool:
    path = request.path
    if path.startswith(JSON_PREFIXES) or path.startswith("/fhir"):
        return True
    return request.accept_mimetypes.best == "application/json"


def _rollback() -> None:
    session = g.get("db")
    if session is not None:
        session.rollback()


def error_response(status: int, code: str, message: str, extra: dict[str, Any] | None = None) -> Response:
    if request.path.startswith("/fhir"):
        body: dict[str, Any] = {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": _fhir_code(status), "diagnostics": message,
                       "details": {"text": code}}],
        }
        resp = jsonify(body)
        resp.mimetype = "application/fhir+json"
    elif wants_json():
        resp = jsonify({"error": code, "message": message, **(extra or {})})
    else:
        resp = Response(render_template("error.html", status=status, message=message), mimetype="text/html")
    resp.status_code = status
    return resp


def _fhir_code(status: int) -> str:
    return {400: "invalid", 401: "security", 403: "forbidden", 404: "not-found", 409: "conflict",
            412: "conflict", 413: "too-costly", 415: "not-supported", 422: "processing",
            429: "throttled"}.get(status, "exception")


def init_app(app: Flask) -> None:
    @app.errorhandler(ShlhostError)
    def _domain(exc: ShlhostError) -> Response:
        _rollback()
        if isinstance(exc, WrongPasscode):
            resp = jsonify({"remainingAttempts": exc.remaining})
            resp.status_code = 401
            return resp
        return error_response(exc.status, exc.code, exc.message, exc.extra or None)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        _rollback()
        status = exc.code or 500
        code = (exc.name or "error").lower().replace(" ", "_")
        message = exc.description or exc.name
        if status == 413:
            message = f"The request body is larger than the limit of {app.config['MAX_CONTENT_LENGTH']} bytes."
        resp = error_response(status, code, message)
        for header in ("Retry-After", "Allow"):
            value = exc.get_response().headers.get(header)
            if value:
                resp.headers[header] = value
        return resp

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        _rollback()
        # The URL rule, not the path: paths carry link ids.
        rule = request.url_rule.rule if request.url_rule else "(no route)"
        app.logger.exception("unexpected error on %s %s", request.method, rule)
        return error_response(500, "internal_error",
                              f"Something went wrong on our side (request {g.get('request_id', '-')}).")
