"""GET /fhir/Bundle/$phr-export: formats, filters, streaming, .sphr, and links made from the
record that stay current."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import pytest
import pyzipper
from sqlalchemy import update

from shlhost.cli import cli
from shlhost.storage.models import ResourceRow
from tests.conftest import fixture_path
from tests.functional.conftest import Fhir, counts
from tests.helpers import decode_link, independent_decrypt

DATA = Path(__file__).resolve().parents[1] / "data"


def res(rtype: str, rid: str, date: str | None = None, patient: str = "p1", **extra) -> dict:
    out = {"resourceType": rtype, "id": rid, **extra}
    if rtype in ("Observation", "Condition", "Procedure", "Encounter"):
        out["subject"] = {"reference": f"Patient/{patient}"}
    if date and rtype == "Observation":
        out["effectiveDateTime"] = date
    elif date and rtype == "Condition":
        out["onsetDateTime"] = date
    return out


RECORD = [
    {"resourceType": "Patient", "id": "p1", "name": [{"family": "One"}], "generalPractitioner": [{"reference": "Practitioner/dr1"}]},
    {"resourceType": "Patient", "id": "p2", "name": [{"family": "Two"}]},
    {"resourceType": "Practitioner", "id": "dr1", "name": [{"family": "Who"}],
     "qualification": [{"code": {"text": "MD"}, "issuer": {"reference": "Organization/org1"}}]},
    {"resourceType": "Organization", "id": "org1", "name": "Clinic"},
    {"resourceType": "Organization", "id": "unrelated", "name": "Elsewhere"},
    res("Observation", "o2009", "2009-12-31T23:00:00Z", status="final", code={"text": "A"}),
    res("Observation", "o2010", "2010-01-01", status="final", code={"text": "B"},
        performer=[{"reference": "Practitioner/dr1"}]),
    res("Observation", "o2020jun", "2020-06-30T23:59:59+02:00", status="final", code={"text": "C"}),
    res("Observation", "o2020jul", "2020-07-01", status="final", code={"text": "D"}),
    res("Condition", "c2024a", "2024-01-01", code={"text": "E"}),
    res("Condition", "c2024z", "2024-12-31T22:00:00Z", code={"text": "F"}),
    res("Condition", "c2025", "2025-01-01", code={"text": "G"}),
    res("Observation", "other", "2015-05-05", patient="p2", status="final", code={"text": "H"}),
]


def ndjson(resources) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in resources)


@pytest.fixture
def record(fhir: Fhir) -> Fhir:
    outcome = fhir.import_(ndjson(RECORD), source="clinic").get_json()
    assert counts(outcome)["created"] == len(RECORD)
    return fhir


def export(fhir: Fhir, **params) -> list[dict]:
    query = "&".join(f"{k}={v}" for k, v in {"outputFormat": "ndjson", **params}.items())
    r = fhir.get(f"Bundle/$phr-export?{query}")
    assert r.status_code == 200, r.get_data(as_text=True)
    return [json.loads(line) for line in r.data.splitlines()]


def ids(resources) -> set[str]:
    return {f"{r['resourceType']}/{r['id']}" for r in resources}


def test_ndjson_and_phr_stream_with_their_headers(record):
    for fmt in ("ndjson", "phr"):
        r = record.get(f"Bundle/$phr-export?outputFormat={fmt}&patient=Patient/p1")
        assert r.status_code == 200 and r.is_streamed
        assert r.mimetype == "application/x-ndjson"
        assert r.headers["Content-Disposition"] == f'attachment; filename="p1.{fmt}"'
        assert r.headers["X-PHR-Version"] == "1.0"
        lines = [json.loads(line) for line in r.data.splitlines()]
        if fmt == "phr":
            assert lines[0]["resourceType"] == "Composition"  # the .phr convention: cover first
            assert lines[1]["resourceType"] == "Patient"
        else:
            assert lines[0]["resourceType"] == "Patient"


def test_default_is_a_document_bundle_with_a_cover_composition(record):
    r = record.get("Bundle/$phr-export")
    assert r.status_code == 200 and r.mimetype == "application/fhir+json"
    bundle = r.get_json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "document" and bundle["timestamp"]
    comp = bundle["entry"][0]["resource"]
    assert comp["resourceType"] == "Composition"
    listed = {e["reference"] for s in comp["section"] for e in s["entry"]}
    exported = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle["entry"][1:]}
    assert listed == exported - {"Patient/p1", "Patient/p2"}
    assert exported == {f"{r['resourceType']}/{r['id']}" for r in RECORD}


def test_whole_record_has_every_resource_with_its_versions(record):
    out = export(record)
    assert ids(out) == {f"{r['resourceType']}/{r['id']}" for r in RECORD}
    assert all(r["meta"]["versionId"] == "1" and r["meta"]["source"] == "clinic" for r in out)
    assert not any(r["resourceType"] == "Provenance" for r in out)  # the server's own import records


@pytest.mark.parametrize("params, expected", [
    ({"start": "2010"}, {"Observation/o2010", "Observation/o2020jun", "Observation/o2020jul", "Condition/c2024a",
                         "Condition/c2024z", "Condition/c2025", "Observation/other"}),
    ({"start": "2010", "end": "2020-06"}, {"Observation/o2010", "Observation/o2020jun", "Observation/other"}),
    ({"start": "2024-01-01", "end": "2024-12-31"}, {"Condition/c2024a", "Condition/c2024z"}),
    ({"end": "2009"}, {"Observation/o2009"}),
])
def test_date_filters(record, params, expected):
    out = ids(export(record, **params))
    dated = {i for i in out if i.split("/")[0] in ("Observation", "Condition")}
    assert dated == expected
    assert {"Patient/p1"} <= out  # the patient comes along


def test_patient_filter_and_no_dangling_references(record):
    out = export(record, patient="Patient/p1", start="2010", end="2010")
    assert ids(out) == {"Patient/p1", "Observation/o2010", "Practitioner/dr1", "Organization/org1"}
    present = ids(out)
    for resource in out:
        for ref in _refs(resource):
            assert ref in present, f"{resource['id']} points at {ref}, which is not in the export"
    assert ids(export(record, patient="Patient/p2")) == {"Patient/p2", "Observation/other"}
    r = record.get("Bundle/$phr-export?patient=Patient/nobody")
    assert r.status_code == 404 and r.get_json()["resourceType"] == "OperationOutcome"


def _refs(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "reference" and isinstance(v, str):
                yield v
            else:
                yield from _refs(v)
    elif isinstance(obj, list):
        for item in obj:
            yield from _refs(item)


def test_type_filter(record):
    out = ids(export(record, _type="Condition"))
    assert out == {"Condition/c2024a", "Condition/c2024z", "Condition/c2025", "Patient/p1", "Patient/p2",
                   "Practitioner/dr1", "Organization/org1"}
    assert record.get("Bundle/$phr-export?_type=Nonsense").status_code == 400


def test_since_gives_only_what_changed(record):
    first = export(record)
    mark = max(r["meta"]["lastUpdated"] for r in first)
    record.import_(ndjson([res("Condition", "c2025", "2025-01-01", code={"text": "G, confirmed"}),
                           res("Condition", "cnew", "2026-02-02", code={"text": "New"})]), source="clinic")
    out = export(record, _since=mark)
    assert {i for i in ids(out) if i.startswith("Condition")} == {"Condition/c2025", "Condition/cnew"}
    assert [r["meta"]["versionId"] for r in out if r["id"] == "c2025"] == ["2"]
    assert record.get("Bundle/$phr-export?_since=yesterday").status_code == 400


@pytest.mark.parametrize("params", ["start=20100", "end=2020-13", "start=2020&end=2010", "outputFormat=pdf",
                                    "end=2021-02-30"])
def test_bad_parameters_are_operation_outcomes(record, params):
    r = record.get(f"Bundle/$phr-export?{params}")
    assert r.status_code == 400 and r.get_json()["resourceType"] == "OperationOutcome"


def test_an_error_mid_stream_is_an_operation_outcome_line(record, app):
    with app.extensions["shlhost"].sessions() as session:
        session.execute(update(ResourceRow).where(ResourceRow.resource_id == "o2010").values(content="{broken"))
        session.commit()
    lines = export(record)
    bad = [line for line in lines if line["resourceType"] == "OperationOutcome"]
    assert len(bad) == 1 and "Observation/o2010" in bad[0]["issue"][0]["diagnostics"]
    assert len(lines) == len(RECORD)  # the stream went on


def test_exports_belong_to_their_account(record, other):
    assert export(other) == []
    assert other.get("Bundle/$phr-export?patient=Patient/p1").status_code == 404


# -- .sphr -------------------------------------------------------------------------------


def _sphr(fhir: Fhir, password: str = "correct horse") -> bytes:
    r = fhir.get("Bundle/$phr-export?outputFormat=sphr", headers={"X-SPHR-Password": password})
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.mimetype == "application/zip"
    return r.data


def _aes_members(data: bytes) -> list[tuple[str, int, int]]:
    """(name, AES strength, method) of each member, read from the local headers by hand:
    WinZip AES (method 99, extra field 0x9901), the format 7-Zip opens given the password."""
    out, pos = [], 0
    while data[pos:pos + 4] == b"PK\x03\x04":
        (_sig, _version, flags, method, _time, _date, _crc, csize, _usize, nlen, xlen) = struct.unpack(
            "<4sHHHHHIIIHH", data[pos:pos + 30])
        name = data[pos + 30:pos + 30 + nlen].decode()
        extra = data[pos + 30 + nlen:pos + 30 + nlen + xlen]
        assert flags & 1 and method == 99, name
        assert extra[:2] == b"\x01\x99"
        _vendor_version, vendor, strength, actual = struct.unpack("<H2sBH", extra[4:11])
        assert vendor == b"AE"
        out.append((name, strength, actual))
        pos += 30 + nlen + xlen + csize
    return out


def test_sphr_is_an_aes256_zip_and_round_trips_losslessly(record, other):
    record.import_(fixture_path("WilliamSim.sphr").read_bytes(), "application/zip", source="sphr")
    data = _sphr(record)
    members = _aes_members(data)
    assert {strength for _n, strength, _m in members} == {3}  # AES-256
    assert {method for _n, _s, method in members} == {8}  # DEFLATE inside
    names = [n for n, _s, _m in members]
    assert "record.phr" in names and sum(n.startswith("attachments/") and n.endswith(".jpg") for n in names) == 2

    outcome = other.post("Bundle/$import", data=data, content_type="application/zip",
                         headers={"X-SPHR-Password": "correct horse"})
    assert outcome.status_code == 200, outcome.get_data(as_text=True)[:300]
    assert counts(outcome.get_json())["errors"] == 0

    def content(fhir: Fhir) -> dict[str, dict]:
        """Each resource without its meta: content, not server metadata."""
        return {f"{r['resourceType']}/{r['id']}": {k: v for k, v in r.items() if k != "meta"} for r in export(fhir)}

    mine, theirs = content(record), content(other)
    assert mine == theirs
    assert sum(k.startswith("Binary/") for k in theirs) == 2


def test_sphr_wrong_password_and_tampering(record, other):
    data = _sphr(record, "s3cret-pass")
    r = other.post("Bundle/$import", data=data, content_type="application/zip", headers={"X-SPHR-Password": "wrong"})
    assert r.status_code == 400 and "password" in r.get_json()["issue"][0]["diagnostics"]
    r = other.post("Bundle/$import", data=data, content_type="application/zip")
    assert r.status_code == 400 and "password" in r.get_json()["issue"][0]["diagnostics"]
    tampered = bytearray(data)
    tampered[len(data) // 2] ^= 0xFF
    r = other.post("Bundle/$import", data=bytes(tampered), content_type="application/zip",
                   headers={"X-SPHR-Password": "s3cret-pass"})
    assert r.status_code == 400
    assert "tampered" in r.get_json()["issue"][0]["diagnostics"] or "not a readable" in r.get_json()["issue"][0]["diagnostics"]
    assert other.get("Patient").get_json()["total"] == 0
    assert record.get("Bundle/$phr-export?outputFormat=sphr").status_code == 400  # no password


def test_sphr_opens_with_the_password_in_a_zip_library(record):
    data = _sphr(record, "pw-for-zip")
    with pyzipper.AESZipFile(io.BytesIO(data)) as z:
        z.setpassword(b"pw-for-zip")
        phr = z.read("record.phr").decode().splitlines()
    assert json.loads(phr[0])["resourceType"] == "Composition"
    assert {json.loads(line)["id"] for line in phr[1:]} == {r["id"] for r in RECORD}


def test_cli_export(record, runner, tmp_path):
    out = tmp_path / "mine.phr"
    result = runner.invoke(cli, ["phr", "export", "--account", record.email, "-o", str(out), "--patient", "Patient/p2"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["resourceType"] for r in lines] == ["Composition", "Patient", "Observation"]
    sphr = tmp_path / "mine.sphr"
    result = runner.invoke(cli, ["phr", "export", "--account", record.email, "-o", str(sphr), "--format", "sphr",
                                 "--password-stdin"], input="cli-pass\n")
    assert result.exit_code == 0, result.output
    with pyzipper.AESZipFile(sphr) as z:
        z.setpassword(b"cli-pass")
        assert len(z.read("record.phr").splitlines()) == len(RECORD) + 1
    result = runner.invoke(cli, ["phr", "export", "--account", record.email, "--start", "20x"])
    assert result.exit_code == 2


# -- links from the record -----------------------------------------------------------------


def _resolve(client, created) -> tuple[dict, dict]:
    entry = client.post(f"/shl/{created['id']}", json={"recipient": "ER", "embeddedLengthMax": 10**7}).get_json()
    return entry, json.loads(independent_decrypt(entry["files"][0]["embedded"], decode_link(created["shlink"])["key"])[1])


def test_long_term_link_from_the_record_stays_current(record, client):
    r = client.post("/api/links", json={"record": {"patient": "Patient/p1"}, "flags": "L", "label": "My record"},
                    headers=record.headers)
    assert r.status_code == 201, r.get_json()
    created = r.get_json()
    assert created["from_record"]["patient"] == "Patient/p1"
    manifest, bundle = _resolve(client, created)
    assert manifest["status"] == "can-change"
    first_updated = manifest["files"][0]["lastUpdated"]
    first_iv = manifest["files"][0]["embedded"].split(".")[2]
    assert bundle["type"] == "document"
    assert "Observation/o2010" in {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle["entry"]}
    assert "Observation/other" not in json.dumps(bundle)  # another patient

    import time

    time.sleep(1.1)  # lastUpdated has second resolution
    record.import_(ndjson([res("Condition", "brand-new", "2026-01-01", code={"text": "Broken arm"})]), source="er")
    manifest, bundle = _resolve(client, created)
    assert manifest["files"][0]["lastUpdated"] > first_updated
    assert manifest["files"][0]["embedded"].split(".")[2] != first_iv  # new IV, same key
    assert "Broken arm" in json.dumps(bundle)


def test_emergency_summary_link(record, client):
    record.import_(ndjson([
        {"resourceType": "AllergyIntolerance", "id": "al1", "patient": {"reference": "Patient/p1"}, "code": {"text": "Peanuts"}},
        {"resourceType": "MedicationStatement", "id": "ms1", "status": "active", "subject": {"reference": "Patient/p1"},
         "medicationCodeableConcept": {"text": "Insulin"}},
    ]), source="gp")
    r = client.post("/api/links", json={"record": "summary", "passcode": "1234"}, headers=record.headers)
    created = r.get_json()
    entry = client.post(f"/shl/{created['id']}", json={"recipient": "ER", "passcode": "1234",
                                                      "embeddedLengthMax": 10**7}).get_json()
    bundle = json.loads(independent_decrypt(entry["files"][0]["embedded"], decode_link(created["shlink"])["key"])[1])
    comp = bundle["entry"][0]["resource"]
    assert comp["title"] == "International Patient Summary"
    codes = {s["code"]["coding"][0]["code"]: s for s in comp["section"]}
    assert set(codes) == {"48765-2", "10160-0", "11450-4", "11369-6"}
    assert codes["48765-2"]["entry"] == [{"reference": "AllergyIntolerance/al1"}]
    assert "emptyReason" in codes["11369-6"]  # no immunizations on record
    types = {e["resource"]["resourceType"] for e in bundle["entry"][1:]}
    assert "Observation" not in types and {"AllergyIntolerance", "MedicationStatement", "Condition", "Patient"} <= types


def test_record_links_need_a_token_and_a_valid_query(client, record):
    assert client.post("/api/links", json={"record": "all"}).status_code == 401
    r = client.post("/api/links", json={"record": {"start": "soon"}}, headers=record.headers)
    assert r.status_code == 400
    r = client.post("/api/links", json={"record": {"colour": "blue"}}, headers=record.headers)
    assert r.status_code == 400 and r.get_json()["error"] == "invalid_record_query"


def test_any_flipped_byte_is_refused_cleanly_or_harmless(record):
    """Flip bytes all over an encrypted .sphr: every outcome is a clear error, never a crash,
    and whatever still imports is unchanged record content (only unauthenticated header
    fields such as timestamps can change without notice)."""
    from shlhost.errors import ShlhostError
    from shlhost.phr.importer import sphr_items

    data = _sphr(record, "pw")
    good = list(sphr_items(io.BytesIO(data), "pw", 10**8))
    outcomes = set()
    for pos in range(0, len(data), max(1, len(data) // 300)):
        flipped = bytearray(data)
        flipped[pos] ^= 0xFF
        try:
            items = list(sphr_items(io.BytesIO(bytes(flipped)), "pw", 10**8))
        except ShlhostError as exc:
            outcomes.add(exc.code)
            continue
        assert [i[1] for i in items] == [i[1] for i in good]
        outcomes.add("unchanged")
    assert outcomes <= {"invalid_sphr", "sphr_wrong_password", "unsafe_archive", "unchanged"}
    assert "invalid_sphr" in outcomes
