"""Record sync between two shlhost instances, for real: A and B are separate gunicorn
servers on separate databases. A shares its record through an L link; B clones it with
``POST /api/pull``, then pulls again after A changed: B gains exactly the change, keeps
its own edits, and a resource both sides changed becomes a conflict on B."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests

from tests.conftest import DATA, LiveServer, make_app
from tests.functional.conftest import counts, new_account
from tests.helpers import decode_link

pytestmark = pytest.mark.live

T = 30


class Side:
    def __init__(self, server: LiveServer, token: str) -> None:
        self.url = server.url
        self.headers = {"Authorization": f"Bearer {token}"}

    def get(self, path: str) -> dict[str, Any]:
        r = requests.get(f"{self.url}/fhir/{path}", headers=self.headers, timeout=T)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    def put(self, path: str, body: dict[str, Any]) -> None:
        r = requests.put(f"{self.url}/fhir/{path}", json=body, headers=self.headers, timeout=T)
        assert r.status_code == 200, r.text

    def import_(self, data: bytes) -> dict[str, int]:
        r = requests.post(
            f"{self.url}/fhir/Bundle/$import?source=clinic-ehr",
            data=data,
            headers={**self.headers, "Content-Type": "application/x-ndjson"},
            timeout=T,
        )
        assert r.status_code == 200, r.text
        return counts(r.json())

    def pull(self, link: str) -> dict[str, int]:
        r = requests.post(
            f"{self.url}/api/pull", json={"link": link}, headers=self.headers, timeout=T
        )
        assert r.status_code == 200, r.text
        return counts(r.json())


@pytest.fixture
def instance_b(base_config, second_database_url, tmp_path_factory):
    config = {
        **base_config,
        "DATABASE_URL": second_database_url,
        "PULL_MIN_INTERVAL": 0,
        "PULL_ALLOW_PRIVATE": "true",
        "BLOB_PATH": str(tmp_path_factory.mktemp("blobs-b")),
    }
    app = make_app(config)
    server = LiveServer(config, workers=1, threads=4)
    yield server, app.test_cli_runner()
    server.stop()
    app.extensions["shlhost"].engine.dispose()


def ndjson(*resources: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in resources)


def test_clone_pull_local_edits_and_conflicts_between_two_instances(
    live_server, runner, instance_b
):
    server_b, runner_b = instance_b
    a = Side(live_server, new_account(runner)[1])
    b = Side(server_b, new_account(runner_b)[1])

    # A: a record from a fixture, shared through an L link made from the record.
    first = a.import_((DATA / "small.phr").read_bytes())
    n = first["created"]
    assert n >= 5
    r = requests.post(
        f"{a.url}/api/links", json={"record": "all", "flags": "L"}, headers=a.headers, timeout=T
    )
    assert r.status_code == 201, r.text
    link = r.json()["shlink"]

    # B clones it: everything A has, sourced from the link, with a Provenance naming it.
    clone = b.pull(link)
    assert clone["created"] == n and clone["updated"] == clone["conflicts"] == 0
    obs_b = b.get("Observation/obs-1")
    manifest_url = decode_link(link)["url"]
    assert obs_b["meta"]["source"] == manifest_url
    provenance = b.get("Provenance")["entry"]
    assert any(e["resource"]["entity"][0]["what"]["display"] == manifest_url for e in provenance)

    # B edits two resources locally (keeping the meta the server gave it).
    med_b = b.get("MedicationStatement/med-1")
    b.put("MedicationStatement/med-1", {**med_b, "note": [{"text": "taken at night (B's note)"}]})
    cond_b = b.get("Condition/cond-1")
    b.put("Condition/cond-1", {**cond_b, "note": [{"text": "B says: controlled"}]})

    # A changes: an update B did not touch, an update of what B edited, two new resources.
    obs_a = a.get("Observation/obs-1")
    cond_a = a.get("Condition/cond-1")
    changes = a.import_(
        ndjson(
            {**obs_a, "valueQuantity": {"value": 128, "unit": "mmHg"}, "meta": {}},
            {**cond_a, "clinicalStatus": {"text": "resolved"}, "meta": {}},
            {
                "resourceType": "Observation",
                "id": "obs-2",
                "status": "final",
                "subject": {"reference": "Patient/pat-1"},
                "code": {"text": "Diastolic BP"},
                "valueQuantity": {"value": 82, "unit": "mmHg"},
            },
            {
                "resourceType": "AllergyIntolerance",
                "id": "alg-1",
                "patient": {"reference": "Patient/pat-1"},
                "code": {"text": "Penicillin"},
            },
        )
    )
    assert changes["updated"] == 2 and changes["created"] == 2

    # B pulls: exactly the change.
    pulled = b.pull(link)
    assert pulled["created"] == 2
    assert pulled["updated"] == 1
    assert pulled["conflicts"] == 1
    assert pulled["unchanged"] == n - 2  # the rest, B's untouched edit of med-1 included
    assert b.get("Observation/obs-1")["valueQuantity"]["value"] == 128
    assert b.get("Observation/obs-1")["meta"]["versionId"] == "2"
    assert b.get("Observation/obs-2")["code"]["text"] == "Diastolic BP"
    assert b.get("AllergyIntolerance/alg-1")["code"]["text"] == "Penicillin"
    # B's own edits survive; the one A also changed is a conflict on B, A's side kept beside it.
    assert b.get("MedicationStatement/med-1")["note"][0]["text"] == "taken at night (B's note)"
    cond_now = b.get("Condition/cond-1")
    assert cond_now["note"][0]["text"] == "B says: controlled" and "clinicalStatus" not in cond_now
    [conflict] = b.get("$conflicts")["entry"]
    parts = {p["name"]: p for p in conflict["resource"]["parameter"]}
    assert parts["target"]["valueString"] == "Condition/cond-1"
    assert parts["incoming"]["resource"]["clinicalStatus"] == {"text": "resolved"}

    # Nothing new on A: the next pull skips the unchanged file and changes nothing.
    again = b.pull(link)
    assert again["created"] == again["updated"] == again["conflicts"] == 0
    assert b.get("Observation/obs-1")["meta"]["versionId"] == "2"
    assert len(b.get("$conflicts")["entry"]) == 1
