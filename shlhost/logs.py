"""Logging with a request id, and a filter that keeps secrets out of every record."""

from __future__ import annotations

import logging
import re
import secrets

from flask import Flask, g, has_request_context, request

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


def init_app(app: Flask) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    app.logger.handlers[:] = [handler]
    app.logger.setLevel(logging.INFO)

    @app.before_request
    def _request_id() -> None:
        incoming = request.headers.get("X-Request-ID", "")
        g.request_id = incoming if re.fullmatch(r"[A-Za-z0-9._-]{1,64}", incoming) else secrets.token_hex(8)
