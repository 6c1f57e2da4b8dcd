"""Files as streams through the API: pre-encrypted JWE files uploaded as multipart parts,
files served from the blob store in pieces, and the server's cap on embedding."""

from __future__ import annotations

import io
import json
import os

import pytest

from shlhost.crypto import jwe
from shlhost.crypto.b64 import b64url_encode
from tests.conftest import make_app
from tests.functional.test_bad_input import _error, _state
from tests.helpers import independent_decrypt, minimal_bundle

FHIR = "application/fhir+json"


def client_token(key: bytes, cty: str = FHIR, size: int = 3 * jwe.CHUNK + 5) -> str:
    """A JWE the patient's own software made: the server never sees ``key``."""
    body = json.dumps({**minimal_bundle(), "padding": "x" * size}).encode()
    out = io.BytesIO()
    jwe.encrypt_stream(io.BytesIO(body), out, key, cty)
    return out.getvalue().decode()


def test_a_jwe_file_upload_is_stored_exactly_and_served_back(api, client):
    key = os.urandom(32)
    token = client_token(key)
    r = api.upload([("record.jwe", b"\n" + token.encode() + b"\n")])
    assert r.status_code == 201, r.get_json()
    created = r.get_json()
    assert created["shlink"] is None and created["files"][0]["contentType"] == FHIR
    assert created["files"][0]["size"] == len(token)
    manifest = api.manifest(created).get_json()
    served = client.get(api.path(manifest["files"][0]["location"]))
    assert served.status_code == 200 and served.mimetype == "application/jose"
    assert served.headers["Content-Length"] == str(len(token))
    assert served.get_data(as_text=True) == token
    assert b"padding" in independent_decrypt(token, b64url_encode(key))[1]


def test_a_jwe_file_takes_its_content_type_from_the_form_field(api):
    token = client_token(os.urandom(32), cty="application/smart-health-card", size=10)
    r = api.upload([("card.jwe", token.encode())], contentType="application/smart-health-card")
    assert r.status_code == 201 and r.get_json()["files"][0]["contentType"] == "application/smart-health-card"


@pytest.mark.parametrize(
    ("token", "status", "code"),
    [
        (lambda t: t.replace(".", "..", 1), 400, "invalid_jwe"),  # an encrypted key with alg dir
        (lambda t: t[:300] + "+" + t[301:], 400, "invalid_jwe"),  # base64, not base64url
        (lambda t: t[: t.rfind(".") + 8], 400, "invalid_jwe"),  # a truncated tag
        (lambda t: "not a jwe at all", 400, "invalid_jwe"),
    ],
)
def test_a_broken_jwe_file_is_refused_and_nothing_is_written(api, app, token, status, code):
    before = _state(app)
    r = api.upload([("record.jwe", token(client_token(os.urandom(32))).encode())])
    _error(r, status, code)
    assert _state(app) == before


def test_a_jwe_file_must_say_its_content_type(api, app):
    header = b64url_encode(json.dumps({"alg": "dir", "enc": "A256GCM"}).encode())
    token = client_token(os.urandom(32))
    no_cty = header + token[token.index("."):]
    before = _state(app)
    _error(api.upload([("x.jwe", no_cty.encode())]), 400, "invalid_files")
    _error(api.upload([("x.jwe", token.encode())], contentType="text/plain"), 415, "unknown_content_type")
    # The form field and the header must agree.
    _error(api.upload([("x.jwe", token.encode())], contentType="application/smart-health-card"), 400,
           "invalid_jwe")
    assert _state(app) == before


def test_a_jwe_file_cannot_join_a_link_whose_key_the_server_holds(api, app):
    created = api.create(flags="L")
    before = _state(app)
    r = api.upload([("x.jwe", client_token(os.urandom(32)).encode())],
                   path=f"/api/links/{created['id']}/files", headers=api.auth(created))
    _error(r, 400, "mixed_files")
    assert _state(app) == before


def test_files_larger_than_the_embedding_cap_go_by_location(base_config):
    app = make_app(base_config, EMBED_MAX_BYTES=2000)
    client = app.test_client()
    small = {"files": [{"contentType": FHIR, "content": minimal_bundle()}]}
    big = {"files": [{"contentType": FHIR, "content": {**minimal_bundle(), "padding": "x" * 5000}}]}
    for body, embedded in ((small, True), (big, False)):
        created = client.post("/api/links", json=body).get_json()
        [entry] = client.post(f"/shl/{created['id']}", json={"recipient": "r", "embeddedLengthMax": 10**9}
                              ).get_json()["files"]
        assert ("embedded" in entry) is embedded and ("location" in entry) is not embedded
    app.extensions["shlhost"].engine.dispose()


def test_a_u_link_serves_its_file_with_its_length(api, client):
    created = api.create(flags="U")
    r = client.get(f"/shl/{created['id']}?recipient=me")
    assert r.status_code == 200 and int(r.headers["Content-Length"]) == len(r.get_data())
    assert b"Patient" in independent_decrypt(r.get_data(as_text=True), api.key(created))[1]
