"""What the manifest's fast path must keep: CORS headers replaced, never doubled, and the
manifest rate limit applied exactly when the app's RATELIMIT_ENABLED says so."""

from __future__ import annotations

from typing import Any

from flask import Response

from shlhost.api.dataplane import CORS_HEADERS, add_cors
from tests.conftest import make_app
from tests.helpers import minimal_bundle


def _link(client: Any) -> str:
    r = client.post("/api/links", json={"files": [{"contentType": "application/fhir+json",
                                                   "content": minimal_bundle()}]})
    assert r.status_code == 201
    link_id: str = r.get_json()["id"]
    return link_id


def test_cors_headers_replace_what_a_view_set(app: Any) -> None:
    with app.test_request_context("/shl/x"):
        resp = add_cors(Response("x", headers={"Cache-Control": "max-age=60", "X-Other": "1"}))
        assert resp.headers.getlist("Cache-Control") == ["no-store"]
        assert resp.headers["X-Other"] == "1"
        for name, value in CORS_HEADERS:
            assert resp.headers.getlist(name) == [value]
        again = add_cors(resp)  # idempotent
        for name, value in CORS_HEADERS:
            assert again.headers.getlist(name) == [value]
    with app.test_request_context("/api/links"):
        assert "Access-Control-Allow-Origin" not in add_cors(Response("x")).headers


def test_an_app_with_the_limiter_off_is_never_limited(base_config: dict[str, Any]) -> None:
    """Even when another app in the process (made later) turned the shared limiter on."""
    free = make_app(base_config, RATELIMIT_MANIFEST="2 per minute", RATELIMIT_ENABLED=False)
    limited = make_app(base_config, RATELIMIT_MANIFEST="2 per minute")
    try:
        for app, expected in ((free, [200] * 4), (limited, [200, 200, 429, 429])):
            client = app.test_client()
            link_id = _link(client)
            codes = [client.post(f"/shl/{link_id}", json={"recipient": "x"}).status_code
                     for _ in range(4)]
            assert codes == expected
    finally:
        for app in (limited, free):
            app.extensions["shlhost"].engine.dispose()
