"""The versioned record store through /fhir: read, update, ETags, history, vread, search,
revert, metadata; and accounts: tokens, and one account never reaching another's data."""

from __future__ import annotations

import json

import pytest

from shlhost.cli import cli
from tests.functional.conftest import counts
from tests.helpers import minimal_bundle

PATIENT = {"resourceType": "Patient", "id": "p1", "name": [{"family": "Doe", "given": ["Jane"]}]}


def obs(value: float, patient: str = "p1") -> dict:
    return {"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "Weight"},
            "subject": {"reference": f"Patient/{patient}"}, "valueQuantity": {"value": value, "unit": "kg"}}


def test_metadata_and_operation_definitions_are_public(client):
    r = client.get("/fhir/metadata")
    assert r.status_code == 200 and r.mimetype == "application/fhir+json"
    cap = r.get_json()
    assert cap["resourceType"] == "CapabilityStatement" and cap["fhirVersion"] == "4.0.1"
    [rest] = cap["rest"]
    patient = next(res for res in rest["resource"] if res["type"] == "Patient")
    assert {i["code"] for i in patient["interaction"]} >= {"read", "vread", "update", "history-instance",
                                                           "history-type", "search-type"}
    assert patient["versioning"] == "versioned-update"
    ops = {op["name"]: op["definition"] for op in rest["operation"]}
    assert ops["import"].endswith("/OperationDefinition/phr-import")
    for name in ("phr-export", "phr-import"):
        d = client.get(f"/fhir/OperationDefinition/{name}").get_json()
        assert d["resourceType"] == "OperationDefinition" and d["resource"] == ["Bundle"]
        assert {p["name"] for p in d["parameter"]} >= {"return"}
    r = client.get("/fhir/OperationDefinition/nope")
    assert r.status_code == 404 and r.get_json()["resourceType"] == "OperationOutcome"


def test_fhir_endpoints_need_an_api_token(client, fhir):
    for path in ("Patient/p1", "Patient", "Patient/_history", "Patient/p1/_history", "$conflicts"):
        r = client.get(f"/fhir/{path}")
        assert r.status_code == 401, path
        assert r.get_json()["resourceType"] == "OperationOutcome"
        bad = client.get(f"/fhir/{path}", headers={"Authorization": "Bearer shl_notarealtoken"})
        assert bad.status_code == 401
        mgmt = client.get(f"/fhir/{path}", headers={"Authorization": "Bearer " + "x" * 43})
        assert mgmt.status_code == 401
    assert client.post("/fhir/Bundle/$import", data=b"{}").status_code == 401


def test_update_read_etag_history_vread(fhir):
    r = fhir.put("Patient/p1", PATIENT)
    assert r.status_code == 201
    assert r.headers["ETag"] == 'W/"1"'
    body = r.get_json()
    assert body["meta"]["versionId"] == "1" and body["meta"]["lastUpdated"].endswith("Z")

    same = fhir.put("Patient/p1", {**PATIENT, "meta": {"versionId": "99"}})
    assert same.status_code == 200 and same.headers["ETag"] == 'W/"1"'  # identical content: no new version

    changed = {**PATIENT, "birthDate": "1970-01-01"}
    r = fhir.put("Patient/p1", changed, headers={"If-Match": 'W/"1"'})
    assert r.status_code == 200 and r.headers["ETag"] == 'W/"2"'
    stale = fhir.put("Patient/p1", {**PATIENT, "gender": "female"}, headers={"If-Match": 'W/"1"'})
    assert stale.status_code == 412 and stale.get_json()["resourceType"] == "OperationOutcome"

    read = fhir.get("Patient/p1")
    assert read.headers["ETag"] == 'W/"2"' and read.get_json()["birthDate"] == "1970-01-01"
    v1 = fhir.get("Patient/p1/_history/1").get_json()
    assert "birthDate" not in v1 and v1["meta"]["versionId"] == "1"
    assert fhir.get("Patient/p1/_history/2").get_json()["birthDate"] == "1970-01-01"
    assert fhir.get("Patient/p1/_history/3").status_code == 404

    history = fhir.get("Patient/p1/_history").get_json()
    assert history["type"] == "history"
    assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == ["2", "1"]  # newest first
    assert history["entry"][0]["response"]["etag"] == 'W/"2"'


def test_revert_writes_the_old_version_back_as_a_new_one(fhir):
    fhir.put("Observation/o1", obs(70))
    fhir.put("Observation/o1", obs(700))  # a typo
    r = fhir.post("Observation/o1/$revert?version=1")
    assert r.status_code == 200 and r.headers["ETag"] == 'W/"3"'
    assert r.get_json()["valueQuantity"]["value"] == 70
    versions = fhir.get("Observation/o1/_history").get_json()["entry"]
    assert [e["resource"]["valueQuantity"]["value"] for e in versions] == [70, 700, 70]  # nothing deleted
    assert fhir.post("Observation/o1/$revert?version=9").status_code == 404


def test_history_type_and_search_by_patient(fhir):
    fhir.put("Patient/p1", PATIENT)
    fhir.put("Patient/p2", {**PATIENT, "id": "p2"})
    fhir.put("Observation/o1", obs(70, "p1"))
    fhir.put("Observation/o2", {**obs(80, "p2"), "id": "o2"})
    fhir.put("Observation/o1", obs(71, "p1"))
    found = fhir.get("Observation?patient=Patient/p1").get_json()
    assert found["type"] == "searchset" and found["total"] == 1
    assert found["entry"][0]["resource"]["valueQuantity"]["value"] == 71
    assert fhir.get("Observation?patient=p2").get_json()["total"] == 1
    assert fhir.get("Observation").get_json()["total"] == 2
    hist = fhir.get("Observation/_history").get_json()
    assert sorted((e["resource"]["id"], e["resource"]["meta"]["versionId"]) for e in hist["entry"]) == [
        ("o1", "1"), ("o1", "2"), ("o2", "1")]


@pytest.mark.parametrize("path, body, status", [
    ("Patient/p1", {"resourceType": "Observation", "id": "p1"}, 400),
    ("Patient/p1", {**PATIENT, "id": "other"}, 400),
    ("Patient/bad_id!", {**PATIENT, "id": "bad_id!"}, 400),
    ("Nonsense/x", {"resourceType": "Nonsense", "id": "x"}, 404),
])
def test_bad_updates_are_operation_outcomes(fhir, path, body, status):
    r = fhir.put(path, body)
    assert r.status_code == status
    assert r.get_json()["resourceType"] == "OperationOutcome"
    assert fhir.get("Patient/p1").status_code == 404


def test_bad_json_update(fhir):
    r = fhir.client.put("/fhir/Patient/p1", data="{nope", headers=fhir.headers, content_type="application/fhir+json")
    assert r.status_code == 400 and r.get_json()["issue"][0]["severity"] == "error"


def test_token_create_prints_only_the_token(runner):
    email = "solo@example.org"
    assert runner.invoke(cli, ["user", "create", email], input="a long password\n").exit_code == 0
    result = runner.invoke(cli, ["token", "create", email])
    lines = result.output.splitlines()
    assert result.exit_code == 0 and len(lines) == 1 and lines[0].startswith("shl_")
    again = runner.invoke(cli, ["user", "create", email], input="a long password\n")
    assert again.exit_code == 2 and "exists" in again.output
    weak = runner.invoke(cli, ["user", "create", "weak@example.org"], input="short\n")
    assert weak.exit_code == 2 and "password" in weak.output
    assert runner.invoke(cli, ["token", "create", "nobody@example.org"]).exit_code == 2


def test_no_account_reaches_another_accounts_records(fhir, other):
    """Every /fhir route, tried by a second account against the first one's data."""
    fhir.put("Patient/p1", PATIENT)
    fhir.put("Patient/p1", {**PATIENT, "gender": "female"})
    r = fhir.import_(json.dumps({**obs(1), "id": "c1"}).encode() + b"\n", source="a")
    fhir.import_(json.dumps({**obs(2), "id": "c1"}).encode() + b"\n", source="b")  # a conflict for A
    assert counts(r.get_json())["created"] == 1
    [conflict] = fhir.get("$conflicts").get_json()["entry"]
    conflict_id = conflict["resource"]["parameter"][0]["valueString"]

    assert other.get("Patient/p1").status_code == 404
    assert other.get("Patient/p1/_history").status_code == 404
    assert other.get("Patient/p1/_history/1").status_code == 404
    assert other.get("Patient").get_json()["total"] == 0
    assert other.get("Patient?patient=p1").get_json()["total"] == 0
    assert other.get("Patient/_history").get_json()["entry"] == []
    assert other.get("$conflicts").get_json()["entry"] == []
    assert other.post(f"$conflicts/{conflict_id}/$resolve", json={"resolution": "take-incoming"}).status_code == 404
    assert other.post("Patient/p1/$revert?version=1").status_code == 404
    # B writing "Patient/p1" makes B's own resource; A's is untouched.
    assert other.put("Patient/p1", {**PATIENT, "name": [{"family": "Intruder"}]}).status_code == 201
    assert other.import_(json.dumps({**PATIENT, "gender": "male"}).encode(), source="x").status_code == 200
    mine = fhir.get("Patient/p1").get_json()
    assert mine["name"][0]["family"] == "Doe" and mine["gender"] == "female" and mine["meta"]["versionId"] == "2"
    assert len(fhir.get("$conflicts").get_json()["entry"]) == 1


def test_links_belong_to_the_token_account(fhir, other, client):
    body = {"files": [{"contentType": "application/fhir+json", "content": minimal_bundle()}]}
    mine = client.post("/api/links", json=body, headers=fhir.headers).get_json()
    anonymous = client.post("/api/links", json=body).get_json()
    listed = client.get("/api/links", headers=fhir.headers).get_json()["links"]
    assert [link["id"] for link in listed] == [mine["id"]]
    assert client.get("/api/links", headers=other.headers).get_json()["links"] == []
    assert client.get("/api/links").status_code == 401
    # The owner's API token manages the link; another account's does not.
    assert client.get(f"/api/links/{mine['id']}", headers=fhir.headers).status_code == 200
    for method in ("get", "patch", "delete"):
        r = getattr(client, method)(f"/api/links/{mine['id']}", headers=other.headers, json={"active": False})
        assert r.status_code == 404, method
    assert client.get(f"/api/links/{anonymous['id']}", headers=fhir.headers).status_code == 404
    assert client.post("/api/links", json=body, headers={"Authorization": "Bearer shl_forged"}).status_code == 401
    assert client.get(f"/api/links/{mine['id']}", headers=fhir.headers).get_json()["status"] == "active"
