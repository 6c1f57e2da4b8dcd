"""A record larger than the client's old 64 MiB cap, pulled for real: a .sphr with a 40 MiB
random attachment is uploaded to a gunicorn server, and ``POST /api/pull`` on that server
pulls the link into another account (manifest, file by location, streamed decryption,
the importer reading the plaintext file). The attachment comes back bit for bit through
the /fhir API."""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.conftest import LiveServer
from tests.functional.conftest import counts, new_account
from tests.live.test_large_files import big_sphr

pytestmark = pytest.mark.live

MiB = 1 << 20


@pytest.fixture(scope="module")
def server(base_config: dict[str, Any]) -> Iterator[LiveServer]:
    config = {
        **base_config,
        "MAX_CONTENT_LENGTH": 100 * MiB,
        "PULL_ALLOW_PRIVATE": "true",
        "PULL_MIN_INTERVAL": 0,
    }
    with LiveServer(config, workers=1, threads=4) as live:
        yield live


@pytest.mark.slow
def test_a_record_over_the_old_cap_is_pulled_and_its_attachment_is_intact(
    server: LiveServer, runner: Any
) -> None:
    image = os.urandom(40 * MiB)
    digest = hashlib.sha256(image).hexdigest()
    r = requests.post(
        server.url + "/api/links",
        files={"file": ("big.sphr", big_sphr(image))},
        data={"label": "CT scan"},
        timeout=300,
    )
    assert r.status_code == 201, r.text[:500]
    created = r.json()
    assert created["files"][0]["size"] > 64 * MiB  # the JWE the old client refused
    del image

    _email, token = new_account(runner)
    headers = {"Authorization": f"Bearer {token}"}
    pulled = requests.post(
        server.url + "/api/pull", json={"link": created["shlink"]}, headers=headers, timeout=600
    )
    assert pulled.status_code == 200, pulled.text[:1000]
    assert counts(pulled.json())["created"] == 2
    assert "files 1" in pulled.json()["issue"][0]["diagnostics"]

    got = requests.get(server.url + "/fhir/DocumentReference/scan", headers=headers, timeout=300)
    assert got.status_code == 200, got.text[:500]
    document = got.json()
    assert document["subject"]["reference"] == "Patient/p1"
    assert document["meta"]["source"] == created["url"]
    attachment = document["content"][0]["attachment"]
    assert attachment["contentType"] == "application/dicom"
    assert attachment["size"] == 40 * MiB
    data = base64.b64decode(attachment["data"], validate=True)
    assert hashlib.sha256(data).hexdigest() == digest
