"""Secrets never reach the logs: a full flow against a real gunicorn server, once with
LOG_FORMAT json and once with text, then the server's captured output (app, gunicorn and
request logs) is searched for every key, passcode, token, ticket, password and
link used."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from shlhost import accounts
from tests.conftest import LiveServer, make_app
from tests.helpers import decode_link, minimal_bundle

pytestmark = [pytest.mark.live]


def _secret(prefix: str) -> str:
    return f"{prefix}-{os.urandom(8).hex()}"


def _link_secrets(created: dict[str, Any]) -> list[str]:
    found = [created["management_token"]]
    if created.get("shlink"):
        found.append(created["shlink"].split("shlink:/", 1)[1][:40])
        found.append(decode_link(created["shlink"])["key"])
    return found


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_no_secret_in_the_server_output(base_config: dict[str, Any], log_format: str) -> None:
    app = make_app(base_config)
    rt = app.extensions["shlhost"]
    password = _secret("account-password")
    try:
        with rt.sessions() as session:
            account = accounts.create_account(
                session,
                rt.hasher,
                f"logs-{os.urandom(4).hex()}@example.org",
                password,
                now=datetime.now(UTC),
            )
            api_token = accounts.create_token(session, account, now=datetime.now(UTC))
    finally:
        rt.engine.dispose()

    secrets: list[str] = [api_token, password]
    server = LiveServer({**base_config, "LOG_FORMAT": log_format}, workers=1, threads=4)
    try:
        b = server.url
        s = requests.Session()
        passcode, new_passcode, sphr_password = _secret("pc"), _secret("pc2"), _secret("sphr")
        secrets += [passcode, new_passcode, sphr_password]

        # A passcode link from a multipart upload.
        r = s.post(
            f"{b}/api/links",
            files={"file": ("record.json", json.dumps(minimal_bundle()).encode())},
            data={"passcode": passcode, "label": "logs", "exp": "2099-01-01"},
            timeout=30,
        )
        assert r.status_code == 201, r.text
        created = r.json()
        secrets += _link_secrets(created)
        auth = {"Authorization": f"Bearer {created['management_token']}"}

        # Manifest: no passcode, a wrong one, the right one (location), the right one (embedded).
        assert (
            s.post(
                f"{b}/shl/{created['id']}", json={"recipient": "Dr Logs"}, timeout=30
            ).status_code
            == 401
        )
        assert (
            s.post(
                f"{b}/shl/{created['id']}",
                json={"recipient": "Dr Logs", "passcode": passcode + "x"},
                timeout=30,
            ).status_code
            == 401
        )
        m = s.post(
            f"{b}/shl/{created['id']}",
            json={"recipient": "Dr Logs", "passcode": passcode},
            timeout=30,
        )
        assert m.status_code == 200, m.text
        location = m.json()["files"][0]["location"]
        ticket = parse_qs(urlsplit(location).query)["ticket"][0]
        secrets.append(ticket.split(".", 1)[1])  # the HMAC; the expiry alone is no secret
        assert s.get(location, timeout=30).status_code == 200
        # A forged ticket, a tampered one: still nothing of them in the logs.
        assert s.get(location[:-3] + "AAA", timeout=30).status_code == 404
        m = s.post(
            f"{b}/shl/{created['id']}",
            json={"recipient": "Dr Logs", "passcode": passcode, "embeddedLengthMax": 10**7},
            timeout=30,
        )
        assert m.status_code == 200 and "embedded" in m.json()["files"][0]

        # Management calls, including a wrong token and a new passcode.
        assert s.get(f"{b}/api/links/{created['id']}", headers=auth, timeout=30).status_code == 200
        wrong = _secret("wrong-management-token")
        secrets.append(wrong)
        assert (
            s.get(
                f"{b}/api/links/{created['id']}",
                headers={"Authorization": f"Bearer {wrong}"},
                timeout=30,
            ).status_code
            == 404
        )
        assert (
            s.patch(
                f"{b}/api/links/{created['id']}",
                json={"passcode": new_passcode},
                headers=auth,
                timeout=30,
            ).status_code
            == 200
        )
        assert (
            s.get(
                f"{b}/api/links/{created['id']}/qr.png?viewer=1", headers=auth, timeout=30
            ).status_code
            == 200
        )
        assert (
            s.get(f"{b}/api/links/{created['id']}/accesses", headers=auth, timeout=30).status_code
            == 200
        )

        # A U link.
        r = s.post(
            f"{b}/api/links",
            json={
                "files": [{"contentType": "application/fhir+json", "content": minimal_bundle()}],
                "flags": "U",
            },
            timeout=30,
        )
        assert r.status_code == 201, r.text
        direct = r.json()
        secrets += _link_secrets(direct)
        assert s.get(f"{b}/shl/{direct['id']}?recipient=Dr%20Logs", timeout=30).status_code == 200

        # The account: import, export (.sphr with a password), a link from the record, the list.
        api = {"Authorization": f"Bearer {api_token}"}
        ndjson = b'{"resourceType":"Patient","id":"logs-p","name":[{"family":"Logs"}]}\n'
        r = s.post(
            f"{b}/fhir/Bundle/$import?source=logs",
            data=ndjson,
            headers={**api, "Content-Type": "application/x-ndjson"},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        assert (
            s.get(
                f"{b}/fhir/Bundle/$phr-export?outputFormat=ndjson", headers=api, timeout=30
            ).status_code
            == 200
        )
        r = s.get(
            f"{b}/fhir/Bundle/$phr-export?outputFormat=sphr",
            headers={**api, "X-SPHR-Password": sphr_password},
            timeout=30,
        )
        assert r.status_code == 200
        r = s.post(f"{b}/api/links", json={"record": "all", "flags": "L"}, headers=api, timeout=60)
        assert r.status_code == 201, r.text
        secrets += _link_secrets(r.json())
        r = s.get(f"{b}/api/links", headers=api, timeout=30)
        assert r.status_code == 200
        bad_api = "shl_" + os.urandom(16).hex()
        secrets.append(bad_api)
        assert (
            s.get(
                f"{b}/fhir/Patient/logs-p",
                headers={"Authorization": f"Bearer {bad_api}"},
                timeout=30,
            ).status_code
            == 401
        )

        # Revoke.
        assert (
            s.delete(f"{b}/api/links/{created['id']}", headers=auth, timeout=30).status_code == 204
        )
    finally:
        server.stop()

    with open(server.log.name, encoding="utf-8") as fh:
        output = fh.read()
    assert "/shl/" in output and "/api/links" in output, (
        "the request log is missing: nothing was checked"
    )
    leaked = [secret for secret in secrets if secret in output]
    assert not leaked, f"secrets in the {log_format} log: {leaked}"
