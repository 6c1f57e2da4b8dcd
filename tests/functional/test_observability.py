"""Prometheus metrics at /metrics and the request log (text or JSON), in one process.
(Aggregation across gunicorn workers is in tests/live/test_scaleout.py.)"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families

from shlhost.logs import JsonFormatter, TextFormatter
from tests.conftest import TEST_KEK, make_app
from tests.functional.conftest import Api


def samples(client: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/plain; version=")
    out = {}
    for family in text_string_to_metric_families(r.get_data(as_text=True)):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(snapshot: dict[Any, float], name: str, **labels: str) -> float:
    return snapshot.get((name, tuple(sorted(labels.items()))), 0.0)


def test_requests_are_counted_by_route_and_status(api: Api, client: Any) -> None:
    created = api.create(passcode="pw")
    before = samples(client)
    assert api.manifest(created, passcode="pw").status_code == 200
    assert api.manifest(created, passcode="nope").status_code == 401
    assert client.get("/no/such/page").status_code == 404
    after = samples(client)

    route = "/shl/<link_id>"
    for status, n in (("200", 1), ("401", 1)):
        key = {"method": "POST", "route": route, "status": status}
        assert (
            value(after, "shlhost_http_requests_total", **key)
            - value(before, "shlhost_http_requests_total", **key)
            == n
        )
    unmatched = {"method": "GET", "route": "(unmatched)", "status": "404"}
    assert (
        value(after, "shlhost_http_requests_total", **unmatched)
        - value(before, "shlhost_http_requests_total", **unmatched)
        == 1
    )
    hist = {"method": "POST", "route": route}
    assert (
        value(after, "shlhost_http_request_duration_seconds_count", **hist)
        - value(before, "shlhost_http_request_duration_seconds_count", **hist)
        == 2
    )
    assert value(after, "shlhost_http_request_duration_seconds_bucket", le="+Inf", **hist) == value(
        after, "shlhost_http_request_duration_seconds_count", **hist
    )
    # Link ids never become label values.
    exposition = client.get("/metrics").get_data(as_text=True)
    assert created["id"] not in exposition and "/no/such/page" not in exposition


def test_manifest_outcomes(api: Api, client: Any) -> None:
    before = samples(client)
    locked = api.create(passcode="right")
    for _ in range(5):
        assert api.manifest(locked, passcode="wrong").status_code == 401
    assert api.manifest(locked, passcode="wrong").status_code == 404  # budget spent
    single = api.create(max_uses=1)
    assert api.manifest(single).status_code == 200
    assert api.manifest(single).status_code == 404
    assert client.post("/shl/" + "x" * 43, json={"recipient": "r"}).status_code == 404
    assert client.post(f"/shl/{single['id']}", json={}).status_code == 400  # not an outcome
    after = samples(client)

    def delta(outcome: str) -> float:
        name = "shlhost_manifest_requests_total"
        return value(after, name, outcome=outcome) - value(before, name, outcome=outcome)

    assert (delta("ok"), delta("wrong_passcode"), delta("dead")) == (1, 5, 3)


def test_metrics_can_be_switched_off(base_config: dict[str, Any]) -> None:
    app = make_app(base_config, METRICS_ENABLED=False)
    try:
        assert app.test_client().get("/metrics").status_code == 404
    finally:
        app.extensions["shlhost"].engine.dispose()


# --- the request log ------------------------------------------------------------------------


def _capture(app: Flask) -> io.StringIO:
    stream = io.StringIO()
    # Ours is the one with shlhost's formatter (pytest may add capture handlers beside it).
    (handler,) = [
        h for h in app.logger.handlers if isinstance(h.formatter, (JsonFormatter, TextFormatter))
    ]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    return stream


@pytest.fixture
def json_app(base_config: dict[str, Any]) -> Iterator[Flask]:
    app = make_app(base_config, LOG_FORMAT="json")
    yield app
    app.extensions["shlhost"].engine.dispose()


def test_json_logs_one_object_per_line_without_secrets(json_app: Flask) -> None:
    stream = _capture(json_app)
    api = Api(json_app.test_client())
    created = api.create(passcode="s3cret-passcode-4711", label="Secret Label")
    token, key = created["management_token"], api.key(created)
    r = api.manifest(created, passcode="s3cret-passcode-4711")
    location = r.get_json()["files"][0]["location"]
    ticket = location.split("ticket=")[1]
    assert api.client.get(api.path(location)).status_code == 200
    assert api.get(created).status_code == 200
    r = api.client.get("/healthz", headers={"X-Request-ID": "trace-me-123"})
    assert r.headers["X-Request-ID"] == "trace-me-123"
    json_app.logger.error("client sent passcode=hunter2 and %s", created["shlink"])
    try:
        raise RuntimeError(f"Authorization: Bearer {token}")
    except RuntimeError:
        json_app.logger.exception("failed")

    lines = stream.getvalue().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert len(records) >= 7
    for rec in records:
        assert {"time", "level", "logger", "request_id", "message"} <= set(rec)
        assert rec["time"].endswith("Z")
    requests_ = [rec for rec in records if "route" in rec]
    assert {(rec["method"], rec["route"], rec["status"]) for rec in requests_} >= {
        ("POST", "/api/links", 201),
        ("POST", "/shl/<link_id>", 200),
        ("GET", "/shl/<link_id>/files/<file_id>", 200),
        ("GET", "/api/links/<link_id>", 200),
        ("GET", "/healthz", 200),
    }
    for rec in requests_:
        assert isinstance(rec["duration"], float) and 0 <= rec["duration"] < 30
        assert rec["request_id"] not in ("", "-")
    assert [rec["request_id"] for rec in requests_ if rec["route"] == "/healthz"] == [
        "trace-me-123"
    ]
    failure = next(rec for rec in records if rec["message"] == "failed")
    assert "RuntimeError" in failure["exc_info"] and "[redacted]" in failure["exc_info"]

    text = stream.getvalue()
    for secret in (
        "s3cret-passcode-4711",
        "hunter2",
        token,
        key,
        ticket,
        created["id"],
        "shlink:/ey",
    ):
        assert secret not in text, secret


def test_text_logs_carry_route_status_and_request_id(base_config: dict[str, Any]) -> None:
    app = make_app(base_config, LOG_FORMAT="text")
    try:
        stream = _capture(app)
        created = Api(app.test_client()).create()
        app.test_client().post(
            f"/shl/{created['id']}", json={"recipient": "r"}, headers={"X-Request-ID": "abc-1"}
        )
        line = next(x for x in stream.getvalue().splitlines() if "[abc-1]" in x)
        assert "INFO" in line and "POST /shl/<link_id> 200" in line and created["id"] not in line
    finally:
        app.extensions["shlhost"].engine.dispose()


@pytest.mark.parametrize(
    ("overrides", "formatter"),
    [
        (
            {"ENV": "production", "SECRET_KEY": "a-real-secret", "KEY_ENCRYPTION_KEY": TEST_KEK},
            JsonFormatter,
        ),
        ({"ENV": "development"}, TextFormatter),
        ({"ENV": "testing"}, TextFormatter),
        (
            {
                "ENV": "production",
                "SECRET_KEY": "a-real-secret",
                "KEY_ENCRYPTION_KEY": TEST_KEK,
                "LOG_FORMAT": "text",
            },
            TextFormatter,
        ),
        ({"ENV": "development", "LOG_FORMAT": "json"}, JsonFormatter),
    ],
)
def test_log_format_defaults_by_env(
    base_config: dict[str, Any], overrides: dict[str, Any], formatter: type
) -> None:
    app = make_app(base_config, **overrides)
    try:
        ours = [
            h.formatter
            for h in app.logger.handlers
            if isinstance(h.formatter, (JsonFormatter, TextFormatter))
        ]
        assert len(ours) == 1 and isinstance(ours[0], formatter)
    finally:
        app.extensions["shlhost"].engine.dispose()
