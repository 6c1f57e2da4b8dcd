"""Rate limits (flask-limiter). Storage is in memory by default, Redis when configured."""

from __future__ import annotations

from flask import Flask, current_app, request
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address

limiter = Limiter(key_func=get_remote_address, headers_enabled=True)


def per_link_key() -> str:
    """One budget per client and link, so one busy link does not starve the others."""
    view_args = request.view_args or {}
    return f"{get_remote_address()}:{view_args.get('link_id', '')}"


def manifest_limit() -> str:
    return str(current_app.config["RATELIMIT_MANIFEST"])


def init_app(app: Flask) -> None:
    limiter.init_app(app)
