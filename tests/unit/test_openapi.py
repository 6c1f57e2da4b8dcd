"""The OpenAPI description (shlhost/api/openapi.py) against the app's url_map: every JSON
route documented with its methods, no stale path or method, and the served copy is it."""

from __future__ import annotations

import re
from typing import Any

from flask import Flask
from flask.testing import FlaskClient

from shlhost.api import openapi

IGNORED_METHODS = {"HEAD", "OPTIONS"}


def _openapi_path(rule: str) -> str:
    """Flask's ``/a/<int:x>/<y>`` as OpenAPI's ``/a/{x}/{y}``."""
    return re.sub(r"<(?:[a-z_]+:)?([a-zA-Z_][a-zA-Z0-9_]*)>", r"{\1}", rule)


def _json_routes(app: Flask) -> dict[str, set[str]]:
    routes: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith(openapi.JSON_PREFIXES):
            continue
        methods = set(rule.methods or ()) - IGNORED_METHODS
        routes.setdefault(_openapi_path(rule.rule), set()).update(m.lower() for m in methods)
    return routes


def _documented(spec: dict[str, Any]) -> dict[str, set[str]]:
    verbs = {"get", "put", "post", "delete", "patch"}
    return {path: {m for m in item if m in verbs} for path, item in spec["paths"].items()}


def test_every_json_route_is_documented_and_nothing_stale(app: Flask) -> None:
    routes = _json_routes(app)
    documented = _documented(openapi.spec(None, app.blueprints))
    assert routes, "no JSON routes found: the prefixes are wrong"
    missing = {
        p: sorted(m - documented.get(p, set()))
        for p, m in routes.items()
        if m - documented.get(p, set())
    }
    stale = {
        p: sorted(m - routes.get(p, set()))
        for p, m in documented.items()
        if m - routes.get(p, set())
    }
    assert not missing, f"JSON routes missing from shlhost/api/openapi.py: {missing}"
    assert not stale, f"paths in shlhost/api/openapi.py that the app does not serve: {stale}"


def test_path_parameters_match_the_rule(app: Flask) -> None:
    for path, item in openapi.spec(None, app.blueprints)["paths"].items():
        names = set(re.findall(r"{([^}]+)}", path))
        for method, op in item.items():
            if method == "parameters":
                continue
            params = [*item.get("parameters", []), *op.get("parameters", [])]
            declared = {p["name"] for p in params if p["in"] == "path"}
            assert declared == names, (
                f"{method.upper()} {path}: path parameters {declared} != {names}"
            )


def test_operation_ids_are_unique() -> None:
    everything = openapi.spec(None, openapi.OPTIONAL_PATHS)
    ids = [
        op["operationId"]
        for item in everything["paths"].values()
        for m, op in item.items()
        if m != "parameters"
    ]
    assert len(ids) == len(set(ids))
    assert all(ids)


def test_served_at_api_openapi_json(app: Flask, client: FlaskClient) -> None:
    resp = client.get("/api/openapi.json")
    assert resp.status_code == 200
    assert resp.mimetype == "application/json"
    body = resp.get_json()
    assert body["openapi"].startswith("3.")
    assert body["paths"] == openapi.spec(None, app.blueprints)["paths"]
    assert body["servers"] == [{"url": "http://localhost"}]


def test_refs_resolve() -> None:
    text = repr(openapi.spec(None, openapi.OPTIONAL_PATHS))
    for ref in set(re.findall(r"#/components/schemas/(\w+)", text)):
        assert ref in openapi.SPEC["components"]["schemas"], ref
