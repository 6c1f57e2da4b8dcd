"""Logging with a request id, and a filter that keeps secrets out of every record.

``LOG_FORMAT`` picks the shape: ``json`` (one object per line: time, level, logger,
request_id, message, and for the line logged after each request method, route, status,
duration in seconds, remote_addr) or ``text``. The default is json in production and text
in development and testing. Every request is logged once, by its URL rule
(``/shl/<link_id>``), never by its raw path or query string, which carry link ids and
location tickets. Messages and tracebacks pass through ``redact`` in both formats.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from datetime import UTC, datetime
from typing import Any

from flask import Flask, Response, g, has_request_context, request

# Anything that looks like a link payload, a bearer token or a passcode field is masked.
_SECRET_PATTERNS = [
    (re.compile(r"shlink:/[A-Za-z0-9_-]+"), "shlink:/[redacted]"),
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"), r"\1[redacted]"),
    (re.compile(r"(?i)(\"?(passcode|password|key|management_token|ticket)\"?\s*[:=]\s*\"?)[^\"&\s,}]+"),
     r"\1[redacted]"),
    (re.compile(r"(?i)([?&]ticket=)[^&\s]+"), r"\1[redacted]"),
]


def redact(text: str) -> str:
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if has_request_context():
            record.request_id = getattr(g, "request_id", "-")
        else:
            record.request_id = "-"
        return True


# Attributes a request's log line carries besides the message (``extra=``).
REQUEST_FIELDS = ("method", "route", "status", "duration", "remote_addr")


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s")

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        return redact(super().formatException(ei))


class JsonFormatter(logging.Formatter):
    """One JSON object per line; nothing in it that the redaction filter has not seen."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": redact(record.getMessage()),
        }
        for name in REQUEST_FIELDS:
            if hasattr(record, name):
                out[name] = getattr(record, name)
        if record.exc_info:
            out["exc_info"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False, default=str)


def log_format(config: dict[str, Any]) -> str:
    chosen = config.get("LOG_FORMAT")
    if chosen:
        return str(chosen)
    return "json" if config.get("ENV") == "production" else "text"


def _route() -> str:
    rule = request.url_rule
    return rule.rule if rule is not None else "(unmatched)"


def init_app(app: Flask) -> None:
    as_json = log_format(app.config) == "json"
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if as_json else TextFormatter())
    handler.addFilter(RedactingFilter())
    app.logger.handlers[:] = [handler]
    app.logger.setLevel(logging.INFO)
    # In JSON mode the root logger may have a JSON handler of its own (gunicorn_conf.py):
    # one line per record, not two.
    app.logger.propagate = not as_json

    @app.before_request
    def _request_id() -> None:
        g.request_start = time.perf_counter()
        incoming = request.headers.get("X-Request-ID", "")
        g.request_id = incoming if re.fullmatch(r"[A-Za-z0-9._-]{1,64}", incoming) else secrets.token_hex(8)

    @app.after_request
    def _log_request(resp: Response) -> Response:
        start = g.get("request_start")
        duration = time.perf_counter() - start if start is not None else 0.0
        route = _route()
        resp.headers.setdefault("X-Request-ID", g.get("request_id", "-"))
        app.logger.info(
            "%s %s %s %.1fms", request.method, route, resp.status_code, duration * 1000,
            extra={"method": request.method, "route": route, "status": resp.status_code,
                   "duration": round(duration, 6), "remote_addr": request.remote_addr},
        )
        return resp
