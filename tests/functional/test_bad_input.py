"""Bad input: each gets a clear JSON error, and nothing is written (no rows, no blobs)."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import func, select

from shlhost.crypto.b64 import b64url_encode
from shlhost.storage.models import Access, Link, LinkFile
from tests.conftest import make_app
from tests.helpers import minimal_bundle

FHIR = "application/fhir+json"
GOOD_FILE = {"contentType": FHIR, "content": minimal_bundle()}


def _state(app):
    with app.extensions["shlhost"].sessions() as session:
        counts = tuple(session.scalar(select(func.count()).select_from(m)) for m in (Link, LinkFile, Access))
    blobs = sorted(p for p in Path(app.config["BLOB_PATH"]).rglob("*") if p.is_file())
    return counts, blobs


@pytest.fixture
def unchanged(app):
    """Asserts, after the test body, that the database and blob store did not change."""
    before = _state(app)
    yield
    assert _state(app) == before


def _error(r, status, code=None):
    assert r.status_code == status, r.get_data(as_text=True)
    assert r.mimetype == "application/json"
    body = r.get_json()
    assert isinstance(body["error"], str) and isinstance(body["message"], str) and body["message"]
    if code:
        assert body["error"] == code, body
    assert "Traceback" not in r.get_data(as_text=True)
    return body


def _jwe(header: dict, iv=b"\0" * 12, tag=b"\0" * 16, key="") -> str:
    return ".".join([b64url_encode(json.dumps(header).encode()), key, b64url_encode(iv),
                     b64url_encode(b"ciphertext"), b64url_encode(tag)])


GOOD_HEADER = {"alg": "dir", "enc": "A256GCM", "cty": FHIR}


@pytest.mark.usefixtures("unchanged")
class TestCreateRefusals:
    def test_malformed_json(self, client):
        r = client.post("/api/links", data='{"files": [', content_type="application/json")
        _error(r, 400, "invalid_json")

    def test_json_that_is_not_an_object(self, client):
        _error(client.post("/api/links", json=[GOOD_FILE]), 400, "invalid_json")

    def test_deeply_nested_json(self, client):
        body = '{"files": ' + "[" * 100_000 + "]" * 100_000 + "}"
        _error(client.post("/api/links", data=body, content_type="application/json"), 400)

    def test_invalid_utf8(self, client):
        r = client.post("/api/links", data=b'{"files": "\xff\xfe"}', content_type="application/json")
        _error(r, 400, "invalid_json")

    def test_no_files(self, client):
        _error(client.post("/api/links", json={"files": []}), 400, "no_files")
        _error(client.post("/api/links", json={"label": "x"}), 400, "invalid_files")

    def test_label_over_80_characters(self, client):
        r = client.post("/api/links", json={"files": [GOOD_FILE], "label": "x" * 81})
        _error(r, 400, "invalid_label")

    @pytest.mark.parametrize("exp", [1, "2001-01-01T00:00:00Z", "yesterday", True, -5])
    def test_exp_in_the_past_or_unreadable(self, client, exp):
        _error(client.post("/api/links", json={"files": [GOOD_FILE], "exp": exp}), 400, "invalid_exp")

    @pytest.mark.parametrize("flags, extra", [("UP", {}), ("U", {"passcode": "pw"}), ("LL", {}), ("X", {}),
                                              ("P", {}), (7, {})])
    def test_bad_flags(self, client, flags, extra):
        r = client.post("/api/links", json={"files": [GOOD_FILE], "flags": flags, **extra})
        _error(r, 400, "invalid_flags")

    def test_u_with_two_files(self, client):
        r = client.post("/api/links", json={"files": [GOOD_FILE, GOOD_FILE], "flags": "U"})
        _error(r, 400, "invalid_flags")

    @pytest.mark.parametrize("max_uses", [0, -1, "many", 1.5])
    def test_bad_max_uses(self, client, max_uses):
        r = client.post("/api/links", json={"files": [GOOD_FILE], "max_uses": max_uses})
        _error(r, 400, "invalid_max_uses")

    def test_unknown_content_type(self, client):
        r = client.post("/api/links", json={"files": [{"contentType": "text/plain", "content": {}}]})
        _error(r, 415, "unknown_content_type")
        token = _jwe({**GOOD_HEADER, "cty": "text/plain"})
        r = client.post("/api/links", json={"files": [{"contentType": "text/plain", "jwe": token}]})
        _error(r, 415, "unknown_content_type")

    def test_content_that_does_not_match_its_type(self, client):
        r = client.post("/api/links", json={"files": [{"contentType": FHIR, "content": {"hello": 1}}]})
        _error(r, 400, "invalid_content")
        r = client.post("/api/links", json={"files": [{"contentType": "application/smart-health-card",
                                                       "content": {"resourceType": "Bundle"}}]})
        _error(r, 400, "invalid_content")

    def test_wrong_request_content_type(self, client):
        _error(client.post("/api/links", data="hello", content_type="text/plain"), 415)

    @pytest.mark.parametrize(
        "token",
        [
            "not-a-jwe",
            "a.b.c.d",
            _jwe({"alg": "none", "enc": "A256GCM", "cty": FHIR}),
            _jwe({"alg": "A128KW", "enc": "A256GCM", "cty": FHIR}),
            _jwe({"alg": "dir", "enc": "A128GCM", "cty": FHIR}),
            _jwe({"alg": "dir", "enc": "A256GCM", "cty": "application/smart-health-card"}),
            _jwe(GOOD_HEADER, key="c29tZWtleQ"),
            _jwe(GOOD_HEADER, tag=b"\0" * 8),
            _jwe(GOOD_HEADER, iv=b"\0" * 8),
            _jwe(GOOD_HEADER).replace("Y2lwaGVydGV4dA", "!!!"),
            _jwe(GOOD_HEADER)[:-8],
        ],
    )
    def test_invalid_uploaded_jwe(self, client, token):
        r = client.post("/api/links", json={"files": [{"contentType": FHIR, "jwe": token}]})
        _error(r, 400, "invalid_jwe")

    def test_unreadable_sphr(self, api):
        _error(api.upload([("record.sphr", b"PK\x03\x04 this is not really a zip")]), 400, "invalid_sphr")
        _error(api.upload([("record.sphr", b"definitely not a zip")]), 400, "invalid_sphr")

    def test_sphr_without_a_phr(self, api):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("photo.jpg", b"\xff\xd8 not much of a photo")
        _error(api.upload([("record.sphr", buf.getvalue())]), 400, "invalid_sphr")

    def test_sphr_with_path_traversal(self, api):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("../../etc/evil.phr", json.dumps({"resourceType": "Patient"}))
        _error(api.upload([("record.sphr", buf.getvalue())]), 400, "unsafe_archive")

    def test_sphr_zip_bomb(self, api):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.writestr("bomb.phr", b"\n" * (64 * 1024 * 1024))
        assert len(buf.getvalue()) < 1024 * 1024
        _error(api.upload([("record.sphr", buf.getvalue())]), 400, "unsafe_archive")

    def test_empty_and_unknown_upload_files(self, api):
        _error(api.upload([("empty.json", b"")]), 400, "empty_file")
        _error(api.upload([("notes.txt", b"just some text")]), 415, "unknown_content_type")
        _error(api.upload([("data.json", b'{"no": "resourceType"}')]), 415, "unknown_content_type")
        _error(api.upload([("broken.phr", b"{not json\n{also not\n")]), 400, "invalid_content")

    def test_a_bad_file_among_good_ones_writes_nothing(self, api):
        good = json.dumps(minimal_bundle()).encode()
        _error(api.upload([("a.json", good), ("b.txt", b"text")]), 415)


def test_body_over_the_size_limit_is_413(base_config, api):
    app = make_app(base_config, MAX_CONTENT_LENGTH=64 * 1024)
    client = app.test_client()
    before = _state(app)
    big = {"files": [{"contentType": FHIR, "content": {"resourceType": "Binary", "data": "A" * 100_000}}]}
    _error(client.post("/api/links", json=big), 413, "request_entity_too_large")
    r = client.post("/api/links", data=b"x" * 100_000, content_type="multipart/form-data; boundary=abc")
    _error(r, 413)
    assert _state(app) == before
    app.extensions["shlhost"].engine.dispose()


def test_wrong_management_token_changes_nothing(api, client, app):
    created = api.create()
    before = _state(app)
    bad = {"Authorization": "Bearer " + created["management_token"][:-1] + "x"}
    _error(client.delete(f"/api/links/{created['id']}", headers=bad), 404, "not_found")
    _error(client.patch(f"/api/links/{created['id']}", json={"active": False}, headers=bad), 404)
    assert _state(app) == before


def test_failed_file_replacement_writes_nothing(api, client, app):
    created = api.create(flags="L")
    file_id = api.get(created).get_json()["files"][0]["id"]
    before = _state(app)
    r = client.put(f"/api/links/{created['id']}/files/{file_id}", headers=api.auth(created),
                   json={"files": [{"contentType": "text/csv", "content": {}}]})
    _error(r, 415)
    assert _state(app) == before


def test_error_pages_for_people_are_html(client):
    r = client.get("/no/such/page", headers={"Accept": "text/html"})
    assert r.status_code == 404 and r.mimetype == "text/html"
    assert b"Not found" in r.data and b"Traceback" not in r.data
