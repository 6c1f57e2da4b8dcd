"""Property tests (hypothesis) across the layers, extending the ones in test_payload.py and
test_jwe.py rather than repeating them:

- link payloads: decode is total (any text gives a Payload or a BadRequest, nothing else);
  round trip through any viewer prefix with unknown properties added by someone else;
- JWE: round trip for sizes up to a megabyte; any tampering or wrong key never decrypts;
- the manifest: embedded files never exceed ``embeddedLengthMax`` (Flask test client, random
  file sizes and limits), and every file at or under the limit is embedded;
- the record store: import then export returns the same resources; re-import changes
  nothing; distinct ids imported in any order give the same store.
"""

from __future__ import annotations

import base64
import json
import os
import random
import uuid
from typing import Any

import pytest
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shlhost.crypto import jwe
from shlhost.errors import BadRequest, ShlhostError
from shlhost.shl.payload import Payload, decode, encode
from tests.functional.conftest import Fhir, counts, new_account

FIXTURE_OK = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# --- link payloads -------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, database=None)
@given(
    text=st.one_of(
        st.text(max_size=300),
        st.text(max_size=200).map(lambda t: "shlink:/" + t),
        st.binary(max_size=200).map(lambda b: "shlink:/" + b64e(b)),
        st.dictionaries(
            st.text(max_size=5), st.none() | st.integers() | st.text(max_size=5), max_size=5
        ).map(lambda d: "shlink:/" + b64e(json.dumps(d).encode())),
    )
)
def test_decode_is_total(text: str) -> None:
    """Whatever a QR scanner hands us: a Payload or a clear BadRequest, never a crash."""
    try:
        found = decode(text)
    except BadRequest as exc:
        assert exc.code == "not_a_link"
    else:
        assert isinstance(found, Payload)
        assert len(found.key) == 43


@settings(max_examples=150, deadline=None, database=None)
@given(
    key=st.binary(min_size=32, max_size=32).map(b64e),
    label=st.none() | st.text(min_size=1, max_size=80),
    exp=st.none() | st.integers(0, 2**41),
    flag=st.sampled_from(["", "L", "P", "LP", "U", "LU"]),
    extra=st.dictionaries(
        st.text(min_size=1, max_size=8).filter(
            lambda k: k not in {"url", "key", "exp", "flag", "label", "v"}
        ),
        st.none() | st.booleans() | st.integers() | st.text(max_size=10),
        max_size=4,
    ),
    viewer=st.none() | st.from_regex(r"https://[a-z]{1,10}\.example/[a-z/]{0,12}", fullmatch=True),
)
def test_round_trip_with_unknown_properties_and_any_viewer(
    key: str,
    label: str | None,
    exp: int | None,
    flag: str,
    extra: dict[str, Any],
    viewer: str | None,
) -> None:
    original = Payload(
        url="https://shl.example.org/shl/" + "A" * 43, key=key, exp=exp, flag=flag, label=label
    )
    link = encode(original, viewer)
    assert decode(link) == original
    # Someone else's encoder adds properties we do not know: they are ignored.
    body = {**extra, **original.to_json()}
    other = "shlink:/" + b64e(json.dumps(body).encode())
    assert decode((viewer + "#" if viewer else "") + other) == original


# --- JWE ------------------------------------------------------------------------------------


def _big(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)  # noqa: S311 - test data


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=FIXTURE_OK)
@given(
    plaintext=st.builds(_big, st.integers(64 * 1024, 1024 * 1024), st.integers(0, 2**32)),
    deflate=st.booleans(),
    key=st.binary(min_size=32, max_size=32),
)
def test_jwe_round_trip_large(plaintext: bytes, deflate: bool, key: bytes) -> None:
    """test_jwe.py covers up to 64 KiB; files are usually bigger."""
    token = jwe.encrypt(plaintext, key, "application/fhir+json", deflate=deflate)
    assert jwe.decrypt(token, key)[1] == plaintext


@settings(max_examples=200, deadline=None, database=None)
@given(
    plaintext=st.binary(min_size=1, max_size=2000),
    key=st.binary(min_size=32, max_size=32),
    data=st.data(),
)
def test_jwe_tampering_never_decrypts(plaintext: bytes, key: bytes, data: st.DataObject) -> None:
    """Flip any character, truncate anywhere, or use another key: an error, never plaintext."""
    token = jwe.encrypt(plaintext, key, "application/fhir+json")
    how = data.draw(st.sampled_from(["flip", "truncate", "key"]))
    if how == "key":
        other = data.draw(st.binary(min_size=32, max_size=32).filter(lambda k: k != key))
        tampered, use = token, other
    elif how == "truncate":
        tampered, use = token[: data.draw(st.integers(0, len(token) - 1))], key
    else:
        at = data.draw(st.integers(0, len(token) - 1))
        replacement = data.draw(st.sampled_from("ABCabc019-_.").filter(lambda c: c != token[at]))
        tampered, use = token[:at] + replacement + token[at + 1 :], key
    try:
        _header, out = jwe.decrypt(tampered, use)
    except (ShlhostError, jwe.DecryptionError):
        return
    # Base64url has slack bits in the last character of a part: a change there may decode
    # to the same bytes. Then, and only then, may it decrypt, and to the same plaintext.
    assert out == plaintext


# --- manifest embedding ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_app(base_config: dict[str, Any]) -> Any:
    from tests.conftest import make_app

    application = make_app(base_config)
    yield application
    application.extensions["shlhost"].engine.dispose()


@settings(max_examples=20, deadline=None, database=None, suppress_health_check=FIXTURE_OK)
@given(sizes=st.lists(st.integers(1, 40_000), min_size=1, max_size=4), data=st.data())
def test_manifest_embedding_never_exceeds_embedded_length_max(
    shared_app: Flask, sizes: list[int], data: st.DataObject
) -> None:
    client = shared_app.test_client()
    files = [
        {
            "contentType": "application/fhir+json",
            "content": {
                "resourceType": "Bundle",
                "type": "collection",
                "entry": [
                    {
                        "resource": {
                            "resourceType": "Basic",
                            "id": "b",
                            "code": {"text": os.urandom(size // 2).hex()},
                        }
                    }
                ],
            },
        }
        for size in sizes
    ]
    r = client.post("/api/links", json={"files": files})
    assert r.status_code == 201, r.get_json()
    created = r.get_json()
    jwe_sizes = sorted(f["size"] for f in created["files"])
    limit = data.draw(
        st.one_of(
            st.integers(0, 2 * max(jwe_sizes)),
            st.sampled_from(jwe_sizes),
            st.sampled_from(jwe_sizes).map(lambda s: s - 1),
        ),
        label="embeddedLengthMax",
    )
    m = client.post(f"/shl/{created['id']}", json={"recipient": "prop", "embeddedLengthMax": limit})
    assert m.status_code == 200, m.get_json()
    entries = m.get_json()["files"]
    assert len(entries) == len(sizes)
    embedded = sorted(len(e["embedded"]) for e in entries if "embedded" in e)
    for entry in entries:
        assert ("embedded" in entry) != ("location" in entry)
        if "embedded" in entry:
            assert len(entry["embedded"]) <= limit
    # Every file that fits is embedded; none that does not.
    assert embedded == [s for s in jwe_sizes if s <= limit]


# --- import / export / merge ----------------------------------------------------------------

_ids = st.from_regex(r"[A-Za-z0-9\-.]{1,20}", fullmatch=True)
_text = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=30
)


@st.composite
def _records(draw: Any) -> list[dict[str, Any]]:
    """A few simple resources with distinct ids: Patients and Observations about them."""
    patient_ids = draw(st.lists(_ids, min_size=1, max_size=3, unique=True))
    out: list[dict[str, Any]] = [
        {
            "resourceType": "Patient",
            "id": pid,
            "name": [{"family": draw(_text)}],
            "active": draw(st.booleans()),
        }
        for pid in patient_ids
    ]
    for oid in draw(st.lists(_ids, max_size=6, unique=True)):
        out.append(
            {
                "resourceType": "Observation",
                "id": oid,
                "status": "final",
                "code": {"text": draw(_text)},
                "subject": {"reference": f"Patient/{draw(st.sampled_from(patient_ids))}"},
                "valueQuantity": {"value": draw(st.integers(-10_000, 10_000)), "unit": "mg"},
            }
        )
    return out


def _ndjson(resources: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in resources)


def _exported(fhir: Fhir) -> dict[tuple[str, str], dict[str, Any]]:
    r = fhir.get("Bundle/$phr-export?outputFormat=ndjson")
    assert r.status_code == 200, r.data[:500]
    out = {}
    for line in r.data.decode().splitlines():
        if not line.strip():
            continue
        resource = json.loads(line)
        if resource["resourceType"] == "Provenance":
            continue
        resource.pop("meta", None)
        out[(resource["resourceType"], resource["id"])] = resource
    return out


def _account(app: Flask) -> Fhir:
    email, token = new_account(app.test_cli_runner(), f"prop-{uuid.uuid4().hex[:12]}@example.org")
    return Fhir(app.test_client(), token, email)


@settings(max_examples=15, deadline=None, database=None, suppress_health_check=FIXTURE_OK)
@given(record=_records(), seed=st.integers(0, 2**32))
def test_import_export_round_trip_idempotent_and_order_insensitive(
    shared_app: Flask, record: list[dict[str, Any]], seed: int
) -> None:
    first = _account(shared_app)
    r = first.import_(_ndjson(record), source="prop")
    assert r.status_code == 200, r.get_json()
    assert counts(r.get_json())["created"] == len(record), r.get_json()
    exported = _exported(first)
    assert exported == {(x["resourceType"], x["id"]): x for x in record}

    # Re-importing the same file changes nothing.
    again = first.import_(_ndjson(record), source="prop")
    assert again.status_code == 200
    c = counts(again.get_json())
    assert c["created"] == 0 and c["updated"] == 0 and c["conflicts"] == 0, c
    assert c["unchanged"] == len(record), c
    assert _exported(first) == exported

    # Distinct ids in another order give the same store.
    shuffled = list(record)
    random.Random(seed).shuffle(shuffled)  # noqa: S311 - test data
    second = _account(shared_app)
    r = second.import_(_ndjson(shuffled), source="prop")
    assert r.status_code == 200
    assert _exported(second) == exported
