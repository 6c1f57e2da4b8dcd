"""Prometheus metrics at ``/metrics`` (text exposition format).

- ``shlhost_http_requests_total{method, route, status}``: ``route`` is the URL rule
  (``/shl/<link_id>``), never the raw path: link ids must not become label values.
- ``shlhost_http_request_duration_seconds{method, route}``: a latency histogram.
- ``shlhost_manifest_requests_total{outcome}``: ``ok``, ``wrong_passcode``, ``dead``.

Under gunicorn every worker is its own process: ``gunicorn_conf.py`` sets
``PROMETHEUS_MULTIPROC_DIR`` before the workers start, prometheus_client then keeps each
worker's values in files there and ``/metrics`` (answered by any one worker) adds them all
up. Without that variable (``flask run``, the tests) the values live in this process.
"""

from __future__ import annotations

import os
import time

from flask import Blueprint, Flask, Response, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

# Decided once, as prometheus_client itself decides when it is first imported.
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

REQUESTS = Counter(
    "shlhost_http_requests",
    "HTTP requests answered, by method, route (URL rule) and status",
    ["method", "route", "status"],
)
LATENCY = Histogram(
    "shlhost_http_request_duration_seconds",
    "Time to answer an HTTP request, by method and route",
    ["method", "route"],
    buckets=(0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
MANIFESTS = Counter(
    "shlhost_manifest_requests",
    "Manifest requests by outcome: ok, wrong_passcode, dead",
    ["outcome"],
)
# Each outcome's child, looked up once (the data plane counts one per manifest request).
MANIFEST_OUTCOMES = {
    outcome: MANIFESTS.labels(outcome) for outcome in ("ok", "wrong_passcode", "dead")
}

bp = Blueprint("metrics", __name__)


def exposition() -> bytes:
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)


@bp.get("/metrics")
def metrics() -> Response:
    resp = Response(exposition(), mimetype=CONTENT_TYPE_LATEST.split(";")[0])
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    resp.headers["Cache-Control"] = "no-store"
    return resp


def _observe(resp: Response) -> Response:
    start = g.get("request_start")
    rule = request.url_rule
    route = rule.rule if rule is not None else "(unmatched)"
    method = request.method if request.method in METHODS else "other"
    REQUESTS.labels(method, route, str(resp.status_code)).inc()
    if start is not None:
        LATENCY.labels(method, route).observe(time.perf_counter() - start)
    return resp


def init_app(app: Flask) -> None:
    """Count every request (after ``logs.init_app``, which starts the clock)."""
    app.after_request(_observe)
    if app.config.get("METRICS_ENABLED", True):
        app.register_blueprint(bp)
