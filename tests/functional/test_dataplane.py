"""The SHL data plane as a conformant client sees it: manifest, files, U links, errors."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from shlhost.shl import tickets
from shlhost.storage.models import Link
from tests.conftest import make_app
from tests.helpers import decode_link, independent_decrypt, jwcrypto_decrypt, minimal_bundle


def test_created_link_follows_the_spec(api):
    created = api.create(label="Summary for Dr. Who")
    link = decode_link(created["shlink"])
    assert created["shlink"].startswith("shlink:/") and "=" not in created["shlink"]
    assert link["url"] == created["url"] == f"http://localhost/shl/{created['id']}"
    assert len(link["url"]) <= 128
    assert len(created["id"]) == 43  # 32 random bytes: 256 bits
    assert len(link["key"]) == 43
    assert link["label"] == "Summary for Dr. Who"
    assert "flag" not in link and "exp" not in link
    assert created["viewer_url"] == f"http://localhost/view#{created['shlink']}"
    assert set(created["qr"]) == {"png", "svg"}
    assert created["management_token"] and created["management_token"] not in created["shlink"]


def test_two_links_never_share_a_key_or_id(api):
    a, b = api.create(), api.create()
    assert a["id"] != b["id"]
    assert api.key(a) != api.key(b)


def test_manifest_embeds_when_asked_and_it_fits(api):
    created = api.create()
    r = api.manifest(created, embeddedLengthMax=1_000_000)
    assert r.status_code == 200
    assert r.mimetype == "application/json"
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    body = r.get_json()
    assert body["status"] == "finalized"
    [entry] = body["files"]
    assert entry["contentType"] == "application/fhir+json"  # plain string, no parameters
    assert "location" not in entry
    datetime.fromisoformat(entry["lastUpdated"].replace("Z", "+00:00"))
    header, plaintext = independent_decrypt(entry["embedded"], api.key(created))
    assert header == {"alg": "dir", "enc": "A256GCM", "cty": "application/fhir+json"}
    assert json.loads(plaintext) == minimal_bundle()
    assert jwcrypto_decrypt(entry["embedded"], api.key(created)) == plaintext


def test_manifest_gives_a_location_without_embedded_length_max(api, client):
    created = api.create()
    [entry] = api.manifest(created).get_json()["files"]
    assert "embedded" not in entry
    assert entry["location"].startswith(f"http://localhost/shl/{created['id']}/files/")
    r = client.get(api.path(entry["location"]))
    assert r.status_code == 200
    assert r.mimetype == "application/jose"
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    _header, plaintext = independent_decrypt(r.get_data(as_text=True), api.key(created))
    assert json.loads(plaintext) == minimal_bundle()


def test_embedded_length_max_smaller_than_the_file_gives_a_location(api):
    created = api.create()
    size = api.get(created).get_json()["files"][0]["size"]
    [exact] = api.manifest(created, embeddedLengthMax=size).get_json()["files"]
    [short] = api.manifest(created, embeddedLengthMax=size - 1).get_json()["files"]
    assert "embedded" in exact and len(exact["embedded"]) == size
    assert "location" in short and "embedded" not in short


def test_long_term_link_says_can_change(api):
    created = api.create(flags="L")
    assert decode_link(created["shlink"])["flag"] == "L"
    assert api.manifest(created).get_json()["status"] == "can-change"


def test_passcode_link(api):
    created = api.create(passcode="1234")
    assert decode_link(created["shlink"])["flag"] == "P"
    wrong = api.manifest(created, passcode="0000")
    assert wrong.status_code == 401
    assert wrong.get_json() == {"remainingAttempts": 4}
    assert wrong.headers["Access-Control-Allow-Origin"] == "*"
    missing = api.manifest(created)
    assert missing.status_code == 401
    assert missing.get_json() == {"remainingAttempts": 4}  # no guess, no attempt spent
    right = api.manifest(created, passcode="1234", embeddedLengthMax=10**6)
    assert right.status_code == 200
    _h, plaintext = independent_decrypt(right.get_json()["files"][0]["embedded"], api.key(created))
    assert b"Metformin" in plaintext


def test_u_link_serves_its_file_directly(api, client):
    created = api.create(flags="U")
    link = decode_link(created["shlink"])
    assert link["flag"] == "U"
    r = client.get(api.path(link["url"]) + "?recipient=Pharmacy%20X")
    assert r.status_code == 200 and r.mimetype == "application/jose"
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    _h, plaintext = independent_decrypt(r.get_data(as_text=True), link["key"])
    assert json.loads(plaintext) == minimal_bundle()
    no_recipient = client.get(api.path(link["url"]))
    assert no_recipient.status_code == 400
    assert no_recipient.get_json()["error"] == "recipient_required"
    assert no_recipient.headers["Access-Control-Allow-Origin"] == "*"


def test_manifest_needs_a_recipient_and_json(api, client):
    created = api.create()
    r = client.post(f"/shl/{created['id']}", json={"embeddedLengthMax": 10})
    assert r.status_code == 400 and r.get_json()["error"] == "recipient_required"
    r = client.post(f"/shl/{created['id']}", data="{not json", content_type="application/json")
    assert r.status_code == 400 and r.get_json()["error"] == "invalid_json"
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    r = api.manifest(created, embeddedLengthMax="lots")
    assert r.status_code == 400


def _set(app, link_id, **values):
    with app.extensions["shlhost"].sessions() as session:
        session.execute(update(Link).where(Link.id == link_id).values(**values))
        session.commit()


def _dead_links(api, app):
    """One link in each dead state, plus an id that was never issued."""
    expired = api.create()
    _set(app, expired["id"], exp=datetime.now(UTC) - timedelta(seconds=1))
    paused = api.create()
    assert api.patch(paused, active=False).status_code == 200
    revoked = api.create()
    assert api.client.delete(f"/api/links/{revoked['id']}", headers=api.auth(revoked)).status_code == 204
    used_up = api.create(max_uses=1)
    assert api.manifest(used_up).status_code == 200
    locked = api.create(passcode="right")
    for _ in range(5):
        assert api.manifest(locked, passcode="wrong").status_code == 401
    return {
        "unknown": {"id": "A" * 43},
        "expired": expired,
        "paused": paused,
        "revoked": revoked,
        "used_up": used_up,
        "locked": locked,
    }


def test_every_dead_link_answers_the_same_404(api, app):
    bodies = {}
    for state, created in _dead_links(api, app).items():
        r = api.manifest(created, passcode="right")
        assert r.status_code == 404, state
        assert r.headers["Access-Control-Allow-Origin"] == "*", state
        bodies[state] = r.get_data()
    assert len(set(bodies.values())) == 1, bodies


def test_locked_link_refuses_even_the_right_passcode(api):
    created = api.create(passcode="right")
    seen = [api.manifest(created, passcode="wrong").get_json()["remainingAttempts"] for _ in range(5)]
    assert seen == [4, 3, 2, 1, 0]
    assert api.manifest(created, passcode="right").status_code == 404
    assert api.get(created).get_json()["status"] == "locked"


def test_single_use_link_works_once(api):
    created = api.create(max_uses=1)
    assert api.manifest(created).status_code == 200
    assert api.manifest(created).status_code == 404
    assert api.get(created).get_json()["status"] == "used_up"


def test_n_use_link(api):
    created = api.create(max_uses=3)
    assert [api.manifest(created).status_code for _ in range(4)] == [200, 200, 200, 404]


def test_wrong_passcodes_do_not_spend_uses(api):
    created = api.create(max_uses=1, passcode="pw")
    assert api.manifest(created, passcode="nope").status_code == 401
    assert api.manifest(created, passcode="pw").status_code == 200


def _location(api, created):
    return api.path(api.manifest(created).get_json()["files"][0]["location"])


def test_forged_expired_and_misdirected_tickets_are_refused(api, client, app):
    created = api.create()
    path = _location(api, created)
    assert client.get(path).status_code == 200
    base, ticket = path.split("?ticket=")
    expiry, mac = ticket.split(".")
    assert client.get(f"{base}?ticket={int(expiry) + 1000}.{mac}").status_code == 404
    assert client.get(base).status_code == 404
    assert client.get(f"{base}?ticket=garbage").status_code == 404
    file_id = base.rsplit("/", 1)[1]
    secret = app.extensions["shlhost"].links.ticket_secret
    stale = tickets.issue(secret, created["id"], file_id, time.time() - 3600, 300)
    r = client.get(f"{base}?ticket={stale}")
    assert r.status_code == 404 and r.headers["Access-Control-Allow-Origin"] == "*"
    other = api.create()
    assert client.get(f"/shl/{other['id']}/files/{file_id}?ticket={ticket}").status_code == 404


def test_tickets_die_with_their_link(api, client):
    created = api.create()
    path = _location(api, created)
    assert client.delete(f"/api/links/{created['id']}", headers=api.auth(created)).status_code == 204
    assert client.get(path).status_code == 404


def test_ticket_outlives_the_last_use_for_its_few_minutes(api, client):
    created = api.create(max_uses=1)
    path = _location(api, created)
    assert client.get(path).status_code == 200


def test_preflight_and_unknown_routes_carry_cors(client):
    r = client.options("/shl/" + "B" * 43, headers={"Origin": "https://viewer.example",
                                                    "Access-Control-Request-Method": "POST"})
    assert r.status_code == 200
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    assert "Content-Type" in r.headers["Access-Control-Allow-Headers"]
    r = client.get("/shl/a/b/c/d")
    assert r.status_code == 404 and r.headers["Access-Control-Allow-Origin"] == "*"


def test_too_many_requests_get_429_with_retry_after(base_config):
    app = make_app(base_config, RATELIMIT_MANIFEST="2 per minute")
    client = app.test_client()
    r = client.post("/api/links", json={"files": [{"contentType": "application/fhir+json",
                                                   "content": minimal_bundle()}]})
    link_id = r.get_json()["id"]
    codes = [client.post(f"/shl/{link_id}", json={"recipient": "x"}) for _ in range(3)]
    assert [c.status_code for c in codes] == [200, 200, 429]
    assert int(codes[2].headers["Retry-After"]) > 0
    assert codes[2].headers["Access-Control-Allow-Origin"] == "*"
    assert codes[2].get_json()["error"]
    app.extensions["shlhost"].engine.dispose()


def test_access_log_records_who_asked(api, client):
    created = api.create(passcode="pw")
    api.manifest(created, passcode="bad", recipient="Eve")
    location = api.path(api.manifest(created, passcode="pw", recipient="Dr. Ada").get_json()["files"][0]["location"])
    client.get(location)
    log = client.get(f"/api/links/{created['id']}/accesses", headers=api.auth(created)).get_json()["accesses"]
    seen = [(a["recipient"], a["action"], a["outcome"]) for a in log]
    assert seen == [(None, "file", "ok"), ("Dr. Ada", "manifest", "ok"), ("Eve", "manifest", "wrong_passcode")]


@pytest.mark.parametrize("embedded", [None, 10**6])
def test_several_files_keep_their_order(api, embedded):
    files = [
        {"contentType": "application/fhir+json", "content": minimal_bundle("One Person")},
        {"contentType": "application/smart-health-card", "content": {"verifiableCredential": ["x.y.z"]}},
    ]
    r = api.client.post("/api/links", json={"files": files})
    created = r.get_json()
    body = {"recipient": "r"}
    if embedded:
        body["embeddedLengthMax"] = embedded
    entries = api.client.post(f"/shl/{created['id']}", json=body).get_json()["files"]
    assert [e["contentType"] for e in entries] == ["application/fhir+json", "application/smart-health-card"]
