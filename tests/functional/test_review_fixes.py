"""Regression tests for defects found in review: a changed KEK, a file replaced while a
manifest is served, over-long passcodes, and link ids in the error log."""

from __future__ import annotations

import logging

from shlhost.shl.links import LinkService
from tests.conftest import make_app
from tests.helpers import independent_decrypt


def test_a_changed_kek_is_a_clear_answer_not_a_500(api, base_config):
    created = api.create()
    other_kek = make_app(base_config, KEY_ENCRYPTION_KEY="b3RoZXIta2VrLTMyLWJ5dGVzLS0tLS0tLS0tLS0tLS0")
    client = other_kek.test_client()
    info = client.get(f"/api/links/{created['id']}", headers=api.auth(created))
    assert info.status_code == 200
    assert info.get_json()["key_unavailable"] is True and "shlink" not in info.get_json()
    qr = client.get(f"/api/links/{created['id']}/qr.png", headers=api.auth(created))
    assert qr.status_code == 409 and qr.get_json()["error"] == "key_unavailable"
    # The data plane never needed the key: the link still resolves.
    assert client.post(f"/shl/{created['id']}", json={"recipient": "x"}).status_code == 200
    other_kek.extensions["shlhost"].engine.dispose()


def test_an_overlong_passcode_is_wrong_even_if_it_starts_right(api):
    right = "p" * 200
    created = api.create(passcode=right)
    r = api.manifest(created, passcode=right + "anything")
    assert r.status_code == 401 and r.get_json() == {"remainingAttempts": 4}
    assert api.manifest(created, passcode=right).status_code == 200


def test_a_file_swapped_during_a_manifest_is_read_again(api, app, monkeypatch):
    created = api.create(flags="L")
    blobs = app.extensions["shlhost"].blobs
    real_get = blobs.get
    calls = []

    def flaky_get(key):
        calls.append(key)
        if len(calls) == 1:
            raise KeyError(key)  # as if replace_file had deleted the old blob just now
        return real_get(key)

    monkeypatch.setattr(blobs, "get", flaky_get)
    r = api.manifest(created, embeddedLengthMax=10**6)
    assert r.status_code == 200 and len(calls) == 2
    assert b"Metformin" in independent_decrypt(r.get_json()["files"][0]["embedded"], api.key(created))[1]


def test_unexpected_errors_log_the_route_not_the_link_id(api, monkeypatch, caplog):
    created = api.create()

    def boom(*_a, **_k):
        raise RuntimeError("simulated")

    monkeypatch.setattr(LinkService, "manifest", boom)
    with caplog.at_level(logging.ERROR):
        r = api.manifest(created)
    assert r.status_code == 500 and "simulated" not in r.get_data(as_text=True)
    logged = " ".join(rec.getMessage() for rec in caplog.records)
    assert "/shl/<link_id>" in logged and created["id"] not in logged



def test_nul_characters_are_refused_not_a_500(api, client, runner):
    """PostgreSQL text cannot hold NUL: every user string stored as text refuses it."""
    from tests.functional.conftest import new_account

    created = api.create(flags="")
    r = api.manifest(created, recipient="a\x00b")
    assert r.status_code == 400 and r.get_json()["error"] == "invalid_recipient"
    u = api.create(flags="U")
    r = client.get(f"/shl/{u['id']}?recipient=a%00b")
    assert r.status_code == 400
    r = client.post("/api/links", json={"files": [{"contentType": "application/fhir+json",
                                                   "content": {"resourceType": "Bundle"}}], "label": "a\x00b"})
    assert r.status_code == 400 and r.get_json()["error"] == "invalid_label"
    _email, token = new_account(runner)
    r = client.post("/fhir/Bundle/$import?source=a%00b", data=b'{"resourceType":"Patient","id":"x"}',
                    content_type="application/x-ndjson", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 400 and r.get_json()["resourceType"] == "OperationOutcome"
    from shlhost.cli import cli

    result = runner.invoke(cli, ["user", "create", "nul\x00@example.org"], input="a long password\n")
    assert result.exit_code == 2
