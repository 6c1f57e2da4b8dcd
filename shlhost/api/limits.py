"""Rate limits (flask-limiter). Storage is in memory by default, Redis when configured."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from flask import Flask, current_app, request
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address

limiter = Limiter(key_func=get_remote_address, headers_enabled=True)

View = TypeVar("View", bound=Callable[..., Any])


def limit(limit_value: Callable[[], str], **options: Any) -> Callable[[View], View]:
    """``limiter.limit(limit_value, **options)``, skipped whole when this app's
    RATELIMIT_ENABLED is off (flask-limiter's own decorator still looks its limits up and
    evaluates an empty list on every request, and the limiter object is shared by every
    app in the process while RATELIMIT_ENABLED belongs to each app)."""

    def decorate(view: View) -> View:
        limited = limiter.limit(limit_value, **options)(view)

        @functools.wraps(view)
        def dispatch(*args: Any, **kwargs: Any) -> Any:
            if current_app.config["RATELIMIT_ENABLED"]:
                return limited(*args, **kwargs)
            return view(*args, **kwargs)

        return dispatch  # type: ignore[return-value]

    return decorate


def per_link_key() -> str:
    """One budget per client and link, so one busy link does not starve the others."""
    view_args = request.view_args or {}
    return f"{get_remote_address()}:{view_args.get('link_id', '')}"


def manifest_limit() -> str:
    return str(current_app.config["RATELIMIT_MANIFEST"])


def init_app(app: Flask) -> None:
    limiter.init_app(app)
