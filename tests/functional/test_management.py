"""The management API: inspect, pause, change, revoke, replace files, QR codes, uploads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jwcrypto import jwe as jw_jwe
from jwcrypto import jwk

from tests.conftest import fixture_path
from tests.helpers import decode_link, independent_decrypt, minimal_bundle, read_qr

CARD = {"verifiableCredential": ["eyJ6aXAiOiJERUYiLCJhbGciOiJFUzI1NiJ9.payload.sig"]}


def test_get_shows_settings_and_state(api):
    created = api.create(label="L1", passcode="pw", max_uses=3, flags="L")
    info = api.get(created).get_json()
    assert info["status"] == "active"
    assert info["flag"] == "LP"
    assert info["passcode"] is True and info["attempts_left"] == 5
    assert info["max_uses"] == 3 and info["uses"] == 0 and info["uses_left"] == 3
    assert info["shlink"] == created["shlink"]  # the owner can show the QR again
    assert len(info["files"]) == 1 and info["files"][0]["contentType"] == "application/fhir+json"
    assert "passcode_hash" not in json.dumps(info) and "pw" not in info.values()
    api.manifest(created, passcode="bad")
    api.manifest(created, passcode="pw")
    info = api.get(created).get_json()
    assert info["attempts_left"] == 4 and info["uses"] == 1 and info["uses_left"] == 2


def test_pause_and_resume(api):
    created = api.create()
    assert api.patch(created, active=False).get_json()["status"] == "paused"
    assert api.manifest(created).status_code == 404
    assert api.patch(created, active=True).get_json()["status"] == "active"
    assert api.manifest(created).status_code == 200


def test_change_label_exp_and_max_uses(api):
    created = api.create(max_uses=1)
    api.manifest(created)
    assert api.manifest(created).status_code == 404
    info = api.patch(created, label="New label", exp="2099-01-01T00:00:00Z", max_uses=2).get_json()
    assert info["label"] == "New label" and info["exp"] == 4070908800 and info["status"] == "active"
    link = decode_link(info["shlink"])
    assert link["label"] == "New label" and link["exp"] == 4070908800
    assert api.manifest(created).status_code == 200
    assert api.patch(created, exp=None).get_json()["exp"] is None


def test_new_passcode_resets_the_budget(api):
    created = api.create(passcode="old")
    for _ in range(4):
        api.manifest(created, passcode="guess")
    assert api.get(created).get_json()["attempts_left"] == 1
    assert api.patch(created, passcode="new").get_json()["attempts_left"] == 5
    assert api.manifest(created, passcode="old").status_code == 401
    assert api.manifest(created, passcode="new").status_code == 200


def test_passcode_cannot_be_added_or_removed(api):
    plain = api.create()
    r = api.patch(plain, passcode="late")
    assert r.status_code == 409 and r.get_json()["error"] == "passcode_flag"
    guarded = api.create(passcode="pw")
    assert api.patch(guarded, passcode=None).status_code == 409


def test_patch_rejects_unknown_fields_and_bad_values(api):
    created = api.create()
    assert api.patch(created, flag="U").get_json()["error"] == "unknown_field"
    assert api.patch(created, active="no").status_code == 400
    assert api.patch(created, exp=1).get_json()["error"] == "invalid_exp"
    assert api.patch(created, label="x" * 81).get_json()["error"] == "invalid_label"
    assert api.patch(created, max_uses=0).get_json()["error"] == "invalid_max_uses"
    assert api.get(created).get_json()["label"] is None


def _blob_files(app):
    root = Path(app.config["BLOB_PATH"])
    return {p for p in root.rglob("*") if p.is_file()}


def test_revoke_purges_ciphertext_and_keeps_tombstone_and_log(api, client, app):
    created = api.create()
    api.manifest(created, recipient="Dr. Before")
    link_dir = Path(app.config["BLOB_PATH"]) / "links" / created["id"]
    assert any(link_dir.iterdir())
    assert client.delete(f"/api/links/{created['id']}", headers=api.auth(created)).status_code == 204
    assert not any(link_dir.iterdir())
    info = api.get(created).get_json()
    assert info["status"] == "revoked" and info["revoked_at"]
    assert "shlink" not in info  # the key is gone too
    assert all(f["purged"] for f in info["files"])
    log = client.get(f"/api/links/{created['id']}/accesses", headers=api.auth(created)).get_json()
    assert log["accesses"][0]["recipient"] == "Dr. Before"
    assert api.manifest(created).status_code == 404
    assert client.delete(f"/api/links/{created['id']}", headers=api.auth(created)).status_code == 204
    assert api.patch(created, active=True).status_code == 409
    assert client.get(f"/api/links/{created['id']}/qr.png", headers=api.auth(created)).status_code == 409


def test_long_term_link_files_can_change(api, client, app):
    created = api.create(flags="L")
    auth = api.auth(created)
    key = api.key(created)
    first = api.manifest(created, embeddedLengthMax=10**6).get_json()["files"][0]
    file_id = api.get(created).get_json()["files"][0]["id"]
    before = _blob_files(app)

    r = client.put(f"/api/links/{created['id']}/files/{file_id}", headers=auth,
                   json={"files": [{"contentType": "application/fhir+json", "content": minimal_bundle("Bo Changed")}]})
    assert r.status_code == 200
    second = api.manifest(created, embeddedLengthMax=10**6).get_json()["files"][0]
    _h, text = independent_decrypt(second["embedded"], key)  # same key
    assert b"Changed" in text
    assert second["embedded"].split(".")[2] != first["embedded"].split(".")[2]  # new IV
    assert second["lastUpdated"] >= first["lastUpdated"]
    after = _blob_files(app)
    assert len(after - before) == 1 and len(before - after) == 1  # old ciphertext deleted

    r = client.post(f"/api/links/{created['id']}/files", headers=auth,
                    json={"files": [{"contentType": "application/smart-health-card", "content": CARD}]})
    assert r.status_code == 201 and len(r.get_json()["files"]) == 2
    entries = api.manifest(created, embeddedLengthMax=10**6).get_json()["files"]
    assert [e["contentType"] for e in entries] == ["application/fhir+json", "application/smart-health-card"]
    _h, card = independent_decrypt(entries[1]["embedded"], key)
    assert json.loads(card) == CARD

    assert client.delete(f"/api/links/{created['id']}/files/{file_id}", headers=auth).status_code == 204
    entries = api.manifest(created).get_json()["files"]
    assert [e["contentType"] for e in entries] == ["application/smart-health-card"]
    assert client.delete(f"/api/links/{created['id']}/files/{file_id}", headers=auth).status_code == 404


def test_finalized_link_files_cannot_change(api, client):
    created = api.create()
    file_id = api.get(created).get_json()["files"][0]["id"]
    body = {"files": [{"contentType": "application/fhir+json", "content": minimal_bundle()}]}
    for r in (
        client.put(f"/api/links/{created['id']}/files/{file_id}", headers=api.auth(created), json=body),
        client.post(f"/api/links/{created['id']}/files", headers=api.auth(created), json=body),
        client.delete(f"/api/links/{created['id']}/files/{file_id}", headers=api.auth(created)),
    ):
        assert r.status_code == 409 and r.get_json()["error"] == "finalized"


def test_u_link_keeps_exactly_one_file(api, client):
    created = api.create(flags="LU")
    file_id = api.get(created).get_json()["files"][0]["id"]
    body = {"files": [{"contentType": "application/fhir+json", "content": minimal_bundle()}]}
    assert client.post(f"/api/links/{created['id']}/files", headers=api.auth(created), json=body).status_code == 409
    assert client.delete(f"/api/links/{created['id']}/files/{file_id}",
                         headers=api.auth(created)).status_code == 409


def _client_jwe(content: bytes, cty: str) -> tuple[str, str]:
    key = jwk.JWK.generate(kty="oct", size=256)
    token = jw_jwe.JWE(content, json.dumps({"alg": "dir", "enc": "A256GCM", "cty": cty}))
    token.add_recipient(key)
    return token.serialize(compact=True), json.loads(key.export())["k"]


def test_pre_encrypted_upload_never_gives_the_server_a_key(api, client):
    token, key = _client_jwe(json.dumps(minimal_bundle()).encode(), "application/fhir+json")
    r = client.post("/api/links", json={"files": [{"contentType": "application/fhir+json", "jwe": token}],
                                        "passcode": "pw"})
    assert r.status_code == 201
    created = r.get_json()
    assert created["shlink"] is None and created["viewer_url"] is None
    assert created["flag"] == "P" and created["url"].endswith(created["id"])
    entry = client.post(f"/shl/{created['id']}", json={"recipient": "r", "passcode": "pw",
                                                       "embeddedLengthMax": 10**6}).get_json()["files"][0]
    assert entry["embedded"] == token
    assert json.loads(independent_decrypt(entry["embedded"], key)[1]) == minimal_bundle()
    qr = client.get(f"/api/links/{created['id']}/qr.png", headers=api.auth(created))
    assert qr.status_code == 409 and qr.get_json()["error"] == "no_key"


def test_pre_encrypted_and_plain_files_do_not_mix(client):
    token, _key = _client_jwe(b"{}", "application/fhir+json")
    r = client.post("/api/links", json={"files": [
        {"contentType": "application/fhir+json", "jwe": token},
        {"contentType": "application/fhir+json", "content": minimal_bundle()}]})
    assert r.status_code == 400 and r.get_json()["error"] == "mixed_files"


@pytest.mark.parametrize("viewer", [False, True])
def test_qr_png_decodes_to_the_link(api, client, viewer):
    created = api.create(label="QR test", passcode="pw", flags="L")
    suffix = "?viewer=1" if viewer else ""
    r = client.get(f"/api/links/{created['id']}/qr.png{suffix}", headers=api.auth(created))
    assert r.status_code == 200 and r.mimetype == "image/png"
    [code] = read_qr(r.data)
    assert code.text == (created["viewer_url"] if viewer else created["shlink"])
    assert code.ec_level == "M"
    svg = client.get(f"/api/links/{created['id']}/qr.svg", headers=api.auth(created))
    assert svg.status_code == 200 and svg.mimetype == "image/svg+xml" and b"<svg" in svg.data


def test_wrong_management_token_is_a_404_like_an_unknown_link(api, client):
    created = api.create()
    bad = {"Authorization": "Bearer " + "x" * 43}
    unknown = client.get("/api/links/" + "Z" * 43, headers=bad)
    assert unknown.status_code == 404
    for method, path in [
        ("get", ""), ("patch", ""), ("delete", ""), ("get", "/accesses"), ("get", "/qr.png"),
        ("get", "/qr.svg"), ("post", "/files"), ("put", "/files/abc"), ("delete", "/files/abc"),
    ]:
        for headers in (bad, {}, {"Authorization": "Basic abc"}):
            r = getattr(client, method)(f"/api/links/{created['id']}{path}", headers=headers, json={})
            assert r.status_code == 404, (method, path, headers)
            assert r.get_data() == unknown.get_data()
    assert api.get(created).get_json()["status"] == "active"


def test_one_owner_cannot_touch_another_owners_link(api, client):
    mine, theirs = api.create(), api.create()
    r = client.delete(f"/api/links/{theirs['id']}", headers=api.auth(mine))
    assert r.status_code == 404
    assert api.get(theirs).get_json()["status"] == "active"


# -- uploads in every format ------------------------------------------------------------




def _content(api, created):
    entry = api.manifest(created, embeddedLengthMax=10**8).get_json()["files"][0]
    header, plaintext = independent_decrypt(entry["embedded"], api.key(created))
    return header["cty"], json.loads(plaintext)


def test_upload_phr_becomes_a_bundle(api, client):
    r = api.upload([("JohnDoe.phr", fixture_path("JohnDoe.phr").read_bytes())], label="John")
    assert r.status_code == 201, r.get_json()
    cty, bundle = _content(api, r.get_json())
    assert cty == "application/fhir+json"
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "collection"
    types = {e["resource"]["resourceType"] for e in bundle["entry"]}
    assert {"Patient", "Composition", "Condition"} <= types
    assert not any("_id" in e["resource"] for e in bundle["entry"])  # the IG's string _id dropped


def test_upload_phr_with_broken_lines_keeps_the_good_ones(api, client):
    data = fixture_path("AdamAnyperson-gx-cancer-patient-adam-anyperson.phr").read_bytes()
    good = 0
    for line in data.splitlines():
        try:
            json.loads(line)
            good += 1
        except ValueError:
            pass
    r = api.upload([("adam.phr", data)])
    assert r.status_code == 201
    _cty, bundle = _content(api, r.get_json())
    assert 0 < len(bundle["entry"]) <= good < len(data.splitlines())


def test_upload_sphr_inlines_its_images(api, client):
    r = api.upload([("WilliamSim.sphr", fixture_path("WilliamSim.sphr").read_bytes())])
    assert r.status_code == 201, r.get_json()
    _cty, bundle = _content(api, r.get_json())
    media = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Media"]
    assert len(media) == 2
    for m in media:
        assert m["content"]["contentType"] == "image/jpeg"
        assert m["content"]["data"] and "url" not in m["content"]
    names = {e["resource"].get("id") for e in bundle["entry"]}
    assert "wsim001" in names


def test_upload_synthea_transaction_bundle_stays_as_is(api, client):
    data = fixture_path("Adriane398_Kuvalis369_4b895168-9500-aad7-3e19-467081f4123f.json").read_bytes()
    r = api.upload([("synthea.json", data)])
    assert r.status_code == 201
    cty, bundle = _content(api, r.get_json())
    assert cty == "application/fhir+json"
    assert bundle == json.loads(data)


def test_upload_smart_health_card_file(api, client):
    r = api.upload([("card.smart-health-card", json.dumps(CARD).encode())])
    assert r.status_code == 201
    cty, content = _content(api, r.get_json())
    assert cty == "application/smart-health-card" and content == CARD


def test_upload_several_files_in_one_form(api, client):
    r = api.upload([("a.json", json.dumps(minimal_bundle()).encode()),
                    ("b.smart-health-card", json.dumps(CARD).encode())],
                   flags="L", max_uses="4", exp="2099-01-01")
    assert r.status_code == 201, r.get_json()
    created = r.get_json()
    assert created["flag"] == "L" and created["max_uses"] == 4 and created["exp"] == 4070908800
    assert [f["contentType"] for f in created["files"]] == ["application/fhir+json", "application/smart-health-card"]
