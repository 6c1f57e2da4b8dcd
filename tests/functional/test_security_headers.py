"""Security headers on every answer, and templates that a strict CSP can serve as they are."""

from __future__ import annotations

import re

import pytest

from tests.conftest import ROOT


def _directives(csp: str) -> dict[str, str]:
    return dict(part.strip().split(" ", 1) for part in csp.split(";"))


@pytest.mark.parametrize("path", ["/", "/view", "/healthz", "/no-such-page", "/api/links/unknown"])
def test_every_answer_carries_the_headers(client, path):
    resp = client.get(path)
    csp = _directives(resp.headers["Content-Security-Policy"])
    assert csp["default-src"] == "'self'"
    assert csp["script-src"] == "'self'" and csp["style-src"] == "'self'"
    assert csp["img-src"] == "'self' data: blob:"
    assert csp["connect-src"] == "*"  # the viewer reads links hosted anywhere
    assert csp["media-src"] == "'self' blob:"
    assert csp["object-src"] == "'none'" and csp["base-uri"] == "'none'"
    assert csp["frame-ancestors"] == "'none'" and csp["form-action"] == "'self'"
    assert "unsafe-inline" not in resp.headers["Content-Security-Policy"]
    assert "unsafe-eval" not in resp.headers["Content-Security-Policy"]
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["Referrer-Policy"] == "no-referrer"
    assert "camera=(self)" in resp.headers["Permissions-Policy"]
    assert "microphone=()" in resp.headers["Permissions-Policy"]


def test_hsts_only_over_https(client):
    assert "Strict-Transport-Security" not in client.get("/view").headers
    secure = client.get("/view", base_url="https://localhost")
    assert secure.headers["Strict-Transport-Security"].startswith("max-age=31536000")


def test_data_plane_keeps_its_cors_answers(client):
    dead = client.post("/shl/" + "x" * 43, json={"recipient": "r"})
    assert dead.status_code == 404
    assert dead.headers["Access-Control-Allow-Origin"] == "*"
    assert "Content-Security-Policy" in dead.headers
    pre = client.options(
        "/shl/" + "x" * 43,
        headers={"Origin": "https://viewer.example", "Access-Control-Request-Method": "POST"},
    )
    assert pre.headers["Access-Control-Allow-Origin"] == "*"
    assert "Content-Type" in pre.headers["Access-Control-Allow-Headers"]


def test_a_view_may_set_its_own_policy(app):
    @app.get("/_custom_csp")
    def custom():  # a view that needs something else keeps its header
        return "ok", 200, {"Content-Security-Policy": "default-src 'none'"}

    assert (
        app.test_client().get("/_custom_csp").headers["Content-Security-Policy"]
        == "default-src 'none'"
    )


def test_viewer_page_holds_no_key_and_no_inline_code(client):
    resp = client.get("/view")
    assert resp.status_code == 200
    html = resp.get_data(as_text=True)
    assert 'src="/static/viewer.js"' in html and 'href="/static/viewer.css"' in html
    assert 'data-jsqr="/static/vendor/jsQR.js"' in html
    assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", html) == []
    with client.get("/static/vendor/jsQR.js") as script:
        assert script.status_code == 200
    assert (ROOT / "static" / "vendor" / "jsQR.LICENSE").is_file()


@pytest.mark.parametrize(
    "template",
    sorted(str(p.relative_to(ROOT / "templates")) for p in (ROOT / "templates").rglob("*.html")),
)
def test_templates_have_no_inline_script_or_style(template):
    """The CSP blocks inline code, so a template that has some would break in browsers."""
    text = (ROOT / "templates" / template).read_text()
    assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", text) == [], (
        "inline <script>: move it to static/"
    )
    assert "<style" not in text, "inline <style>: move it to static/*.css"
    assert not re.search(r"\sstyle\s*=", text), "style= attribute: use a class"
    assert not re.search(r"\son[a-z]+\s*=", text), "inline event handler: use addEventListener"
    assert "javascript:" not in text.lower()
