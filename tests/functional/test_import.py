"""POST /fhir/Bundle/$import: formats, merge, provenance, conflicts, validate, bad input."""

from __future__ import annotations

import base64
import io
import json
import zipfile
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, fixture_path, make_app, require
from tests.functional.conftest import Fhir, counts, new_account

DATA = Path(__file__).resolve().parents[1] / "data"


def ndjson(*resources: dict) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in resources)


def cond(label: str, rid: str = "c1", **extra) -> dict:
    return {"resourceType": "Condition", "id": rid, "subject": {"reference": "Patient/p1"},
            "code": {"text": label}, **extra}


def total_versions(fhir: Fhir, rtype: str) -> int:
    return len(fhir.get(f"{rtype}/_history?_count=1000").get_json()["entry"])


def fixture_names() -> list[str]:
    if not FIXTURES.is_dir():
        return ["(fixtures absent)"]
    return sorted(p.name for p in FIXTURES.iterdir() if p.suffix in (".phr", ".json", ".sphr"))


@pytest.mark.parametrize("name", fixture_names())
def test_every_ig_fixture_imports_without_a_server_error(fhir, name):
    path = fixture_path(name)
    kind = {".phr": "application/x-ndjson", ".json": "application/fhir+json", ".sphr": "application/zip"}[path.suffix]
    r = fhir.import_(path.read_bytes(), kind, source=name)
    assert r.status_code == 200, r.get_data(as_text=True)[:500]
    outcome = r.get_json()
    assert outcome["resourceType"] == "OperationOutcome"
    c = counts(outcome)
    assert c["created"] > 0
    again = counts(fhir.import_(path.read_bytes(), kind, source=name).get_json())
    assert again["created"] == again["updated"] == again["conflicts"] == 0  # re-import is a no-op


@pytest.mark.parametrize("name, expected", [
    ("JohnDoe.phr", {"created": 16, "updated": 0, "unchanged": 0, "conflicts": 0, "errors": 0}),
    ("WilliamSim.phr", {"created": 11, "updated": 0, "unchanged": 0, "conflicts": 0, "errors": 0}),
    ("Bundle-PhrBundle-example.json", {"created": 5, "updated": 0, "unchanged": 0, "conflicts": 0, "errors": 0}),
    ("Adriane398_Kuvalis369_4b895168-9500-aad7-3e19-467081f4123f.json",
     {"created": 448, "updated": 0, "unchanged": 0, "conflicts": 0, "errors": 0}),
    # 459 lines: 365 broken JSON lines (each an error naming its line), one exact duplicate.
    ("AdamAnyperson-gx-cancer-patient-adam-anyperson.phr",
     {"created": 93, "updated": 0, "unchanged": 1, "conflicts": 0, "errors": 365}),
    # One CarePlan id carries two different care plans in the same file: kept as a conflict.
    ("TimmySmart-FosterCareTimeline.phr", {"created": 90, "updated": 0, "unchanged": 60, "conflicts": 1, "errors": 0}),
])
def test_fixture_counts(fhir, name, expected):
    path = fixture_path(name)
    kind = "application/fhir+json" if name.endswith(".json") else "application/x-ndjson"
    outcome = fhir.import_(path.read_bytes(), kind, source=name).get_json()
    assert {k: v for k, v in counts(outcome).items() if k != "warnings"} == expected


def test_broken_lines_are_named_and_the_rest_is_kept(fhir):
    outcome = fhir.import_((DATA / "small.phr").read_bytes(), source="small").get_json()
    c = counts(outcome)
    assert c["created"] == 5 and c["errors"] == 1
    errors = [i for i in outcome["issue"] if i["severity"] == "error"]
    assert errors[0]["location"] == ["line 4"] and "JSON" in errors[0]["diagnostics"]
    warnings = " ".join(i["diagnostics"] for i in outcome["issue"] if i["severity"] == "warning")
    assert "line 1" in warnings and "_id" in warnings  # the IG's string _id
    assert "STU3" in warnings and "line 6" in warnings  # Immunization.notDone
    assert fhir.get("Patient/pat-1").get_json()["name"][0]["family"] == "Tester"
    assert "_id" not in fhir.get("Patient/pat-1").get_json()


def test_reimport_changes_nothing_and_says_so(fhir):
    data = (DATA / "small.phr").read_bytes()
    first = fhir.import_(data, source="clinic").get_json()
    assert first["issue"][0]["details"]["text"].startswith("Provenance/import-")
    before = total_versions(fhir, "Condition"), total_versions(fhir, "Provenance")
    again = fhir.import_(data, source="clinic").get_json()
    c = counts(again)
    assert (c["created"], c["updated"], c["unchanged"], c["conflicts"]) == (0, 0, 5, 0)
    assert again["issue"][0]["diagnostics"].startswith("nothing changed")
    assert (total_versions(fhir, "Condition"), total_versions(fhir, "Provenance")) == before


def test_an_updated_resource_becomes_version_2(fhir):
    fhir.import_(ndjson(cond("Asthma")), source="hospital-a")
    c = counts(fhir.import_(ndjson(cond("Asthma, severe")), source="hospital-a").get_json())
    assert c["updated"] == 1 and c["conflicts"] == 0
    current = fhir.get("Condition/c1")
    assert current.headers["ETag"] == 'W/"2"' and current.get_json()["code"]["text"] == "Asthma, severe"
    assert fhir.get("Condition/c1/_history/1").get_json()["code"]["text"] == "Asthma"
    assert current.get_json()["meta"]["source"] == "hospital-a"


def test_provenance_names_the_source_and_what_changed(fhir):
    outcome = fhir.import_(ndjson(cond("Asthma"), cond("Gout", "c2")), source="https://hospital-a.example/fhir").get_json()
    prov_ref = outcome["issue"][0]["details"]["text"]
    prov = fhir.get(prov_ref).get_json()
    assert prov["resourceType"] == "Provenance"
    assert sorted(t["reference"] for t in prov["target"]) == ["Condition/c1/_history/1", "Condition/c2/_history/1"]
    assert prov["entity"][0]["what"]["display"] == "https://hospital-a.example/fhir"


def test_two_sources_disagreeing_keep_both_until_resolved(fhir):
    fhir.import_(ndjson(cond("Type 2 diabetes")), source="hospital-a")
    c = counts(fhir.import_(ndjson(cond("Type 1 diabetes")), source="hospital-b").get_json())
    assert c["conflicts"] == 1 and c["updated"] == 0
    assert fhir.get("Condition/c1").get_json()["code"]["text"] == "Type 2 diabetes"  # nothing overwritten
    [entry] = fhir.get("$conflicts").get_json()["entry"]
    params = {p["name"]: p for p in entry["resource"]["parameter"]}
    assert params["stored"]["resource"]["code"]["text"] == "Type 2 diabetes"
    assert params["storedSource"]["valueString"] == "hospital-a"
    assert params["incoming"]["resource"]["code"]["text"] == "Type 1 diabetes"
    assert params["incomingSource"]["valueString"] == "hospital-b"
    # The same disagreement again is not a second conflict.
    assert counts(fhir.import_(ndjson(cond("Type 1 diabetes")), source="hospital-b").get_json())["conflicts"] == 0
    assert len(fhir.get("$conflicts").get_json()["entry"]) == 1

    conflict_id = params["id"]["valueString"]
    r = fhir.post(f"$conflicts/{conflict_id}/$resolve", json={"resolution": "take-incoming"})
    assert r.status_code == 200
    current = fhir.get("Condition/c1")
    assert current.get_json()["code"]["text"] == "Type 1 diabetes" and current.headers["ETag"] == 'W/"2"'
    assert current.get_json()["meta"]["source"] == "hospital-b"
    assert fhir.get("$conflicts").get_json()["entry"] == []
    assert fhir.post(f"$conflicts/{conflict_id}/$resolve", json={"resolution": "keep-stored"}).status_code == 409


@pytest.mark.parametrize("choice", ["keep-stored", "keep-both"])
def test_other_resolutions(fhir, choice):
    fhir.import_(ndjson(cond("Migraine")), source="a")
    fhir.import_(ndjson(cond("Tension headache")), source="b")
    [entry] = fhir.get("$conflicts").get_json()["entry"]
    conflict_id = entry["resource"]["parameter"][0]["valueString"]
    assert fhir.post(f"$conflicts/{conflict_id}/$resolve", json={"resolution": choice}).status_code == 200
    assert fhir.get("Condition/c1").get_json()["code"]["text"] == "Migraine"
    texts = sorted(e["resource"]["code"]["text"] for e in fhir.get("Condition").get_json()["entry"])
    assert texts == (["Migraine", "Tension headache"] if choice == "keep-both" else ["Migraine"])
    assert fhir.post(f"$conflicts/{conflict_id}/$resolve", json={"resolution": "nonsense"}).status_code == 409


def test_narrative_only_differences_are_not_conflicts(fhir):
    fhir.import_(ndjson(cond("Asthma", text={"status": "generated", "div": "<div>A</div>"})), source="a")
    c = counts(fhir.import_(ndjson(cond("Asthma", text={"status": "generated", "div": "<div>B</div>"})),
                            source="b").get_json())
    assert c["conflicts"] == 0 and c["unchanged"] == 1


def test_matching_by_business_identifier_and_by_content(fhir):
    ident = [{"system": "urn:hospital:conditions", "value": "C-77"}]
    fhir.import_(ndjson(cond("Gout", "c1", identifier=ident)), source="a")
    # Same identifier, another id, same source: the same resource, now version 2.
    c = counts(fhir.import_(ndjson(cond("Gout, chronic", "other-id", identifier=ident)), source="a").get_json())
    assert c["updated"] == 1 and c["created"] == 0
    assert fhir.get("Condition/c1").get_json()["code"]["text"] == "Gout, chronic"
    assert fhir.get("Condition/other-id").status_code == 404
    # Same content under another id: a duplicate, nothing to do.
    c = counts(fhir.import_(ndjson(cond("Gout, chronic", "copy", identifier=ident)), source="z").get_json())
    assert c["unchanged"] == 1 and c["created"] == 0


def test_identifiers_shared_by_many_resources_do_not_merge_them(fhir):
    shared = {"system": "urn:claims:group", "value": "99999999999"}
    fhir.import_(ndjson(cond("Claim A", "a1", identifier=[shared]), cond("Claim B", "a2", identifier=[shared])),
                 source="a")
    c = counts(fhir.import_(ndjson(cond("Claim C", "a3", identifier=[shared])), source="a").get_json())
    assert c["created"] == 1 and c["updated"] == 0


def test_validate_mode_writes_nothing(fhir):
    r = fhir.import_((DATA / "small.phr").read_bytes(), source="x", mode="validate")
    assert r.status_code == 200
    outcome = r.get_json()
    assert counts(outcome)["created"] == 5 and counts(outcome)["errors"] == 1
    assert outcome["issue"][0]["diagnostics"].startswith("validated only, nothing written")
    assert fhir.get("Patient").get_json()["total"] == 0
    assert fhir.get("Provenance").get_json()["total"] == 0


def test_strict_mode_refuses_the_whole_file(fhir):
    r = fhir.import_((DATA / "small.phr").read_bytes(), source="x", strict="true")
    assert r.status_code == 422
    outcome = r.get_json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert fhir.get("Patient").get_json()["total"] == 0
    clean = ndjson({"resourceType": "Patient", "id": "ok", "name": [{"family": "Fine"}]})
    assert counts(fhir.import_(clean, strict="true").get_json())["created"] == 1


def test_transaction_bundle_with_uuid_and_conditional_references(fhir):
    practitioner = {"resourceType": "Practitioner", "id": "pr1",
                    "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": "9999999999"}]}
    fhir.import_(ndjson(practitioner), source="directory")
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:11111111-2222-3333-4444-555555555555",
         "resource": {"resourceType": "Patient", "name": [{"family": "Uuid"}]},
         "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": "urn:uuid:aaaaaaaa-2222-3333-4444-555555555555",
         "resource": {"resourceType": "Encounter", "status": "finished", "class": {"code": "AMB"},
                      "subject": {"reference": "urn:uuid:11111111-2222-3333-4444-555555555555"},
                      "participant": [{"individual": {
                          "reference": "Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|9999999999"}}],
                      "serviceProvider": {"reference": "Organization?identifier=urn:x|nowhere"}},
         "request": {"method": "POST", "url": "Encounter"}},
    ]}
    outcome = fhir.import_(json.dumps(bundle).encode(), "application/fhir+json", source="ehr").get_json()
    assert counts(outcome)["created"] == 2
    enc = fhir.get("Encounter/aaaaaaaa-2222-3333-4444-555555555555").get_json()
    assert enc["subject"]["reference"] == "Patient/11111111-2222-3333-4444-555555555555"
    assert enc["participant"][0]["individual"]["reference"] == "Practitioner/pr1"
    assert enc["serviceProvider"]["reference"] == "Organization?identifier=urn:x|nowhere"
    assert any("Organization?identifier" in i["diagnostics"] for i in outcome["issue"])
    assert fhir.get("Encounter?patient=Patient/11111111-2222-3333-4444-555555555555").get_json()["total"] == 1


def test_synthea_references_point_at_stored_resources(fhir):
    path = fixture_path("Adriane398_Kuvalis369_4b895168-9500-aad7-3e19-467081f4123f.json")
    fhir.import_(path.read_bytes(), "application/fhir+json", source="synthea")
    found = fhir.get("Encounter?patient=Patient/4b895168-9500-aad7-3e19-467081f4123f&_count=1").get_json()
    assert found["total"] > 10
    assert found["entry"][0]["resource"]["subject"]["reference"] == "Patient/4b895168-9500-aad7-3e19-467081f4123f"


def test_sphr_sample_keeps_its_images_reachable(fhir):
    r = fhir.import_(fixture_path("WilliamSim.sphr").read_bytes(), "application/zip", source="sphr")
    assert r.status_code == 200
    assert counts(r.get_json())["created"] == 16  # the 14 lines of its .phr + 2 images as Binary
    media = fhir.get("Media").get_json()["entry"]
    assert len(media) == 2
    for m in media:
        url = m["resource"]["content"]["url"]
        assert url.startswith("Binary/")
        binary = fhir.get(url).get_json()
        assert binary["contentType"] == "image/jpeg"
        assert base64.b64decode(binary["data"])[:2] == b"\xff\xd8"  # a JPEG


def _zip(members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _refused(fhir: Fhir, r, status: int = 400) -> dict:
    assert r.status_code == status, r.get_data(as_text=True)[:300]
    body = r.get_json()
    assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["severity"] == "error"
    assert "Traceback" not in r.get_data(as_text=True)
    assert fhir.get("Patient").get_json()["total"] == 0
    assert fhir.get("Provenance").get_json()["total"] == 0
    return body


PATIENT_LINE = json.dumps({"resourceType": "Patient", "id": "z1"}).encode() + b"\n"


def test_bad_input_is_a_clear_operation_outcome_and_writes_nothing(fhir):
    _refused(fhir, fhir.import_(b""))
    _refused(fhir, fhir.import_(b"   \n\n"))
    _refused(fhir, fhir.import_(PATIENT_LINE, "text/csv"))
    _refused(fhir, fhir.import_(_zip({"../../evil.phr": PATIENT_LINE}), "application/zip"))
    _refused(fhir, fhir.import_(_zip({"x/link.phr": PATIENT_LINE, "x/../../etc": b"x"}), "application/zip"))
    bomb = _zip({"bomb.phr": b"\n" * (64 * 1024 * 1024)}, zipfile.ZIP_DEFLATED)
    _refused(fhir, fhir.import_(bomb, "application/zip"))
    _refused(fhir, fhir.import_(b"PK\x03\x04 not a zip at all", "application/zip"))
    _refused(fhir, fhir.import_(_zip({"photo.jpg": b"\xff\xd8"}), "application/zip"))
    # A Bundle that breaks off is refused whole: the entries before the break are not written.
    broken = json.dumps({"resourceType": "Bundle", "type": "collection",
                         "entry": [{"resource": {"resourceType": "Patient", "id": "z1"}}] * 3}).encode()[:-10]
    _refused(fhir, fhir.import_(broken, "application/fhir+json"))


def test_bad_lines_are_issues_not_failures(fhir):
    lines = [
        b'{"resourceType": "Patient", "id": "good"}',
        b"{broken json",
        b'{"hello": "not FHIR"}',
        b'{"resourceType": "Patientt", "id": "typo"}',
        b'["a", "list"]',
        b'{"resourceType": "Patient", "id": "bad \xff utf8"}',
    ]
    outcome = fhir.import_(b"\n".join(lines)).get_json()
    c = counts(outcome)
    assert c["created"] == 1 and c["errors"] == 5
    located = {i["location"][0] for i in outcome["issue"] if i["severity"] == "error"}
    assert located == {"line 2", "line 3", "line 4", "line 5", "line 6"}
    assert any("Patientt is not a FHIR R4 resource type" in i["diagnostics"] for i in outcome["issue"])


def test_a_huge_single_line_is_skipped_with_an_issue(fhir, monkeypatch):
    from shlhost.phr import importer

    monkeypatch.setattr(importer, "MAX_LINE", 4096)
    huge = json.dumps({"resourceType": "Binary", "id": "big", "data": "A" * 100_000}).encode()
    outcome = fhir.import_(PATIENT_LINE + huge + b"\n" + PATIENT_LINE.replace(b"z1", b"z2")).get_json()
    c = counts(outcome)
    assert c["created"] == 2 and c["errors"] == 1
    [error] = [i for i in outcome["issue"] if i["severity"] == "error"]
    assert error["location"] == ["line 2"] and "longer than" in error["diagnostics"]


def test_body_over_the_limit(base_config, runner):
    app = make_app(base_config, MAX_CONTENT_LENGTH=10_000)
    client = app.test_client()
    _email, token = new_account(app.test_cli_runner())
    r = client.post("/fhir/Bundle/$import", data=PATIENT_LINE * 1000, content_type="application/x-ndjson",
                    headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 413 and r.get_json()["resourceType"] == "OperationOutcome"
    app.extensions["shlhost"].engine.dispose()


def test_content_types(fhir):
    for i, kind in enumerate(["application/fhir+ndjson", "application/x-ndjson", "application/ndjson"]):
        line = json.dumps({"resourceType": "Patient", "id": f"n{i}", "name": [{"family": f"N{i}"}]}).encode()
        assert counts(fhir.import_(line, kind).get_json())["created"] == 1, kind
    single = json.dumps({"resourceType": "Patient", "id": "single", "gender": "other"}).encode()
    assert counts(fhir.import_(single, "application/fhir+json").get_json())["created"] == 1


def test_cli_import(runner, fhir, tmp_path):
    from shlhost.cli import cli

    result = runner.invoke(cli, ["phr", "import", str(DATA / "small.phr"), "--account", fhir.email])
    assert result.exit_code == 0, result.output
    assert "created 5" in result.output and "errors 1" in result.output
    assert fhir.get("Patient/pat-1").get_json()["meta"]["source"] == "small.phr"
    result = runner.invoke(cli, ["phr", "import", str(DATA / "small.phr"), "--account", fhir.email])
    assert "created 0" in result.output and "unchanged 5" in result.output
    result = runner.invoke(cli, ["phr", "import", str(DATA / "small.phr"), "--account", "nobody@example.org"])
    assert result.exit_code == 2


def test_sphr_fixture_required_in_ci():
    require(FIXTURES.is_dir(), f"the PHR IG fixtures are not at {FIXTURES}")
