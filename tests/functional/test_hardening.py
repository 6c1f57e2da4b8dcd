"""Bad inputs from the catalogue in docs/security.md that no other test covered."""

from __future__ import annotations

import io
import json
import stat
import zipfile
from urllib.parse import urlsplit

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import LiveServer
from tests.functional.conftest import Api, Fhir
from tests.functional.test_bad_input import FHIR, GOOD_FILE, _error, _state
from tests.helpers import minimal_bundle


def test_conflict_id_past_any_database_integer_is_404(fhir: Fhir) -> None:
    """Found by the schemathesis run: a 20-digit id reached the driver and answered 500."""
    for big in ("27279383978505211904", str(2**56 - 1), str(2**31)):  # 2**56-1: on PostgreSQL
        r = fhir.post(f"$conflicts/{big}/$resolve", json={"resolution": "keep-stored"})
        assert r.status_code == 404, big
        assert r.get_json()["resourceType"] == "OperationOutcome"


# --- IDOR: every id-bearing management route, with someone else's credentials -------------


def _id_routes(app: Flask) -> list[tuple[str, str]]:
    routes = []
    for rule in app.url_map.iter_rules():
        if "<link_id>" in rule.rule and rule.rule.startswith("/api/"):
            for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
                routes.append((method, rule.rule))
    return routes


def test_every_link_route_refuses_another_owner(
    app: Flask, client: FlaskClient, api: Api, fhir: Fhir, other: Fhir
) -> None:
    """Another link's management token, another account's API token, or none: always the
    same 404 as an unknown link, and the link is untouched."""
    body = {"files": [{"contentType": FHIR, "content": minimal_bundle()}], "flags": "L"}
    victim = client.post("/api/links", json=body, headers=fhir.headers).get_json()
    file_id = victim["files"][0]["id"]
    attacker_link = api.create()
    routes = _id_routes(app)
    assert len(routes) >= 9
    unknown = client.get("/api/links/" + "Z" * 43, headers=other.headers)
    for method, rule in routes:
        path = rule.replace("<link_id>", victim["id"]).replace("<file_id>", file_id)
        for headers in (api.auth(attacker_link), other.headers, {}):
            r = client.open(
                path,
                method=method,
                headers=headers,
                json={"files": [GOOD_FILE], "active": False, "label": "pwned"},
            )
            assert r.status_code == 404, (method, rule, headers, r.get_data(as_text=True))
            assert r.get_data() == unknown.get_data()
    owner = client.get(f"/api/links/{victim['id']}", headers=fhir.headers).get_json()
    assert owner["status"] == "active" and owner["label"] is None
    assert [f["id"] for f in owner["files"]] == [file_id]
    listed = client.get("/api/links", headers=other.headers).get_json()["links"]
    assert victim["id"] not in {link["id"] for link in listed}


# --- malformed, deeply nested and non-UTF-8 JSON on every JSON body ------------------------

BAD_BODIES = [
    pytest.param(b"{", id="truncated"),
    pytest.param(b'{"a": }', id="syntax"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, id="deeply-nested-array"),
    pytest.param(b'{"a":' * 50_000 + b"1" + b"}" * 50_000, id="deeply-nested-object"),
    pytest.param(b'{"recipient": "\xff\xfe", "label": "\xc3\x28"}', id="invalid-utf8"),
    pytest.param(b"\x00\x01\x02", id="binary"),
    pytest.param(b"", id="empty"),
]


@pytest.mark.parametrize("raw", BAD_BODIES)
def test_bad_json_bodies_are_400_everywhere(
    client: FlaskClient, api: Api, fhir: Fhir, raw: bytes
) -> None:
    created = api.create(flags="L")
    file_id = created["files"][0]["id"]
    targets = [
        ("POST", "/api/links", {}),
        ("POST", f"/shl/{created['id']}", {}),
        ("PATCH", f"/api/links/{created['id']}", api.auth(created)),
        ("POST", f"/api/links/{created['id']}/files", api.auth(created)),
        ("PUT", f"/api/links/{created['id']}/files/{file_id}", api.auth(created)),
        ("PUT", "/fhir/Patient/bad-json", fhir.headers),
    ]
    for method, path, headers in targets:
        r = client.open(
            path, method=method, data=raw, content_type="application/json", headers=headers
        )
        assert r.status_code == 400, (method, path, r.status_code, r.get_data(as_text=True)[:300])
        assert b"Traceback" not in r.data
    assert api.get(created).get_json()["status"] == "active"


# --- huge headers (gunicorn's limits, on the real server) -----------------------------------


def test_huge_and_many_headers_are_refused_and_the_server_lives_on(live_server: LiveServer) -> None:
    for headers in (
        {"X-Huge": "a" * 64 * 1024},
        {f"X-Many-{i}": "x" for i in range(300)},
        {"Authorization": "Bearer " + "t" * 20_000},
    ):
        try:
            r = requests.get(f"{live_server.url}/healthz", headers=headers, timeout=30)
        except requests.ConnectionError:
            continue  # the server may hang up instead of answering: also fine
        assert r.status_code in (400, 431), (r.status_code, r.text[:200])
    assert requests.get(f"{live_server.url}/readyz", timeout=30).status_code == 200


def test_a_long_url_is_refused(live_server: LiveServer) -> None:
    r = requests.get(f"{live_server.url}/shl/{'A' * 20_000}", timeout=30)
    assert r.status_code in (400, 414)
    assert requests.get(f"{live_server.url}/readyz", timeout=30).status_code == 200


# --- symbolic links in a .sphr ---------------------------------------------------------------


def _sphr_with_symlink(target: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("record.phr", json.dumps({"resourceType": "Patient", "id": "p"}) + "\n")
        link = zipfile.ZipInfo("attachments/photo.jpg")
        link.create_system = 3  # Unix, so the mode bits count
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(link, target)
    return buf.getvalue()


@pytest.mark.parametrize("target", ["/etc/passwd", "../../instance/config.py", "record.phr"])
def test_sphr_with_a_symlink_member_is_refused(
    app: Flask, api: Api, fhir: Fhir, target: str
) -> None:
    before = _state(app)
    _error(api.upload([("record.sphr", _sphr_with_symlink(target))]), 400, "unsafe_archive")
    assert _state(app) == before
    r = fhir.import_(_sphr_with_symlink(target), content_type="application/zip")
    assert r.status_code == 400, r.get_data(as_text=True)
    assert fhir.get("Patient/p").status_code == 404


# --- open redirects -------------------------------------------------------------------------

EVIL = "https://evil.example/phish"


def test_no_route_redirects_to_a_user_given_url(app: Flask, client: FlaskClient) -> None:
    """Every GET route, with every usual redirect parameter pointing elsewhere: no answer
    sends the browser off this site. (The patient pages' ``next`` has its own test.)"""
    params = {
        name: EVIL
        for name in (
            "next",
            "url",
            "redirect",
            "redirect_uri",
            "return_to",
            "continue",
            "r",
            "to",
            "target",
            "dest",
            "destination",
            "goto",
        )
    }
    checked = 0
    for rule in app.url_map.iter_rules():
        if "GET" not in (rule.methods or set()):
            continue
        path = rule.rule
        for arg in rule.arguments:
            path = (
                path.replace(f"<{arg}>", "x")
                .replace(f"<int:{arg}>", "1")
                .replace(f"<path:{arg}>", "x")
            )
        for extra in ({}, {"Referer": EVIL}):
            r = client.get(path, query_string=params, headers=extra)
            checked += 1
            location = r.headers.get("Location", "")
            # A relative location (or one to this host) may carry the parameter along in its
            # own query; what matters is where the browser goes.
            assert urlsplit(location).netloc in ("", "localhost"), (path, location)
            assert not location.startswith(("//", "/\\")), (path, location)
    assert checked > 20


@pytest.mark.parametrize(
    "query",
    [
        "Patient/fuzz/_history/%C2%B3",
        "Patient/fuzz/_history/99999999999999999999",
        "Patient?_count=%C2%B3",
        "Patient?_offset=%C2%B3",
        "Patient?_offset=99999999999999999999999",
        "Patient/_history?_count=%C2%B2",
        "Patient/fuzz/$revert?version=%C2%B3",
    ],
)
def test_non_ascii_digits_and_huge_numbers_in_fhir_parameters(fhir: Fhir, query: str) -> None:
    """Found by schemathesis: "³".isdigit() is true, and int("³") raised: a 500."""
    fhir.put("Patient/fuzz", {"resourceType": "Patient", "id": "fuzz"})
    method = fhir.post if "$revert" in query else fhir.get
    r = method(query)
    assert r.status_code in (200, 400, 404), (query, r.status_code, r.get_data(as_text=True)[:300])
    assert r.get_json()["resourceType"] in ("OperationOutcome", "Bundle")
