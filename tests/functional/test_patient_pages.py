"""The patient pages through Flask's test client: sessions, CSRF, the sign-in rate limit,
uploads, conflicts, sharing, link management, and that one account never reaches another's."""

from __future__ import annotations

import io
import json
import re
import uuid
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.datastructures import FileStorage, MultiDict
from werkzeug.test import encode_multipart

from tests.conftest import DATA, make_app
from tests.helpers import decode_link, independent_decrypt, minimal_bundle

PASSWORD = "a good long password"
TOKEN_RE = re.compile(r'name="csrf_token" value="([^"]+)"')


def token(client: FlaskClient, path: str = "/patient/signin") -> str:
    found = TOKEN_RE.search(client.get(path).get_data(as_text=True))
    assert found, path
    return found.group(1)


def sign_up(client: FlaskClient, email: str | None = None) -> str:
    email = email or f"p-{uuid.uuid4().hex[:10]}@example.org"
    r = client.post(
        "/patient/signup",
        data={
            "csrf_token": token(client, "/patient/signup"),
            "email": email,
            "password": PASSWORD,
            "password2": PASSWORD,
        },
    )
    assert r.status_code == 303, r.get_data(as_text=True)
    return email


def upload(
    client: FlaskClient,
    name: str,
    data: bytes,
    *,
    headers: dict[str, str] | None = None,
    **form: str,
) -> Any:
    """A multipart upload encoded in memory (the test client spools to a file it never closes)."""
    csrf = form.pop("csrf_token", None) or token(client, "/patient/")
    fields: list[tuple[str, Any]] = [
        ("file", FileStorage(io.BytesIO(data), filename=name)),
        ("csrf_token", csrf),
        *form.items(),
    ]
    boundary, body = encode_multipart(MultiDict(fields))
    return client.post(
        "/patient/upload",
        data=body,
        content_type=f"multipart/form-data; boundary={boundary}",
        headers=headers or {},
    )


def share(client: FlaskClient, **form: str) -> str:
    data = {
        "csrf_token": token(client, "/patient/share"),
        "scope": "all",
        "expires": "30",
        "uses": "any",
        **form,
    }
    r = client.post("/patient/share", data=data)
    assert r.status_code == 303, r.get_data(as_text=True)
    match = re.search(r"/patient/links/([\w-]{43})\?created=1$", r.headers["Location"])
    assert match, r.headers["Location"]
    return match.group(1)


@pytest.fixture
def patient(client: FlaskClient) -> FlaskClient:
    sign_up(client)
    return client


def test_cookie_flags_and_a_new_session_on_sign_in(app: Flask, client: FlaskClient) -> None:
    email = sign_up(client)
    cookie = client.get_cookie("session")
    assert (
        cookie is not None and cookie.http_only and cookie.same_site == "Lax" and not cookie.secure
    )
    before = token(client, "/patient/")
    client.post("/patient/signout", data={"csrf_token": before})
    assert client.get("/patient/").status_code == 302
    anonymous = token(client)
    r = client.post(
        "/patient/signin", data={"csrf_token": anonymous, "email": email, "password": PASSWORD}
    )
    assert r.status_code == 303 and r.headers["Location"] == "/patient/"
    after = token(client, "/patient/")
    assert after not in (before, anonymous)  # no fixation: a fresh session and token

    secure = app.test_client()
    r = secure.get("/patient/signin", base_url="https://localhost")
    assert "Secure" in r.headers["Set-Cookie"] and "HttpOnly" in r.headers["Set-Cookie"]


def test_wrong_password_and_bad_sign_up(client: FlaskClient) -> None:
    email = sign_up(client)
    client.post("/patient/signout", data={"csrf_token": token(client, "/patient/")})
    r = client.post(
        "/patient/signin",
        data={"csrf_token": token(client), "email": email, "password": "nope-nope"},
    )
    assert r.status_code == 401 and "do not match" in r.get_data(as_text=True)
    assert client.get("/patient/").status_code == 302
    r = client.post(
        "/patient/signin",
        data={"csrf_token": token(client), "email": "nobody@example.org", "password": PASSWORD},
    )
    assert r.status_code == 401
    t = token(client, "/patient/signup")
    for form, words in (
        ({"email": email, "password": PASSWORD, "password2": PASSWORD}, "exists"),
        ({"email": "x@example.org", "password": "short", "password2": "short"}, "8 characters"),
        ({"email": "x@example.org", "password": PASSWORD, "password2": "other one"}, "differ"),
        ({"email": "not-an-email", "password": PASSWORD, "password2": PASSWORD}, "email"),
    ):
        r = client.post("/patient/signup", data={"csrf_token": t, **form})
        assert r.status_code == 400 and words in r.get_data(as_text=True), form


def test_next_only_goes_to_patient_pages(client: FlaskClient) -> None:
    email = sign_up(client)
    client.post("/patient/signout", data={"csrf_token": token(client, "/patient/")})
    assert client.get("/patient/links").headers["Location"] == "/patient/signin?next=/patient/links"
    for target, expected in (
        ("/patient/links", "/patient/links"),
        ("https://evil.example/", "/patient/"),
        ("//evil.example/patient", "/patient/"),
    ):
        r = client.post(
            "/patient/signin",
            query_string={"next": target},
            data={"csrf_token": token(client), "email": email, "password": PASSWORD},
        )
        assert r.headers["Location"] == expected
        client.post("/patient/signout", data={"csrf_token": token(client, "/patient/")})


def test_sign_in_is_rate_limited(base_config: dict[str, Any]) -> None:
    app = make_app(base_config, RATELIMIT_SIGNIN="3 per minute")
    try:
        client = app.test_client()
        t = token(client)
        form = {"csrf_token": t, "email": "x@example.org", "password": "wrong-password"}
        assert [client.post("/patient/signin", data=form).status_code for _ in range(3)] == [
            401
        ] * 3
        r = client.post("/patient/signin", data=form)
        assert r.status_code == 429 and "text/html" in r.content_type
        assert client.get("/patient/signin").status_code == 200  # the form itself is not limited
    finally:
        app.extensions["shlhost"].engine.dispose()


def _every_form(client: FlaskClient, link_id: str) -> list[tuple[str, dict[str, str]]]:
    forms = [
        (
            "/patient/signup",
            {"email": "new@example.org", "password": PASSWORD, "password2": PASSWORD},
        ),
        ("/patient/signin", {"email": "new@example.org", "password": PASSWORD}),
        ("/patient/signout", {}),
        ("/patient/share", {"scope": "all"}),
        ("/patient/conflicts/1", {"resolution": "keep-stored"}),
    ]
    forms += [
        (f"/patient/links/{link_id}/{action}", {"days": "7", "passcode": "9999", "confirm": "1"})
        for action in ("pause", "resume", "extend", "passcode", "revoke")
    ]
    return forms


def test_every_form_refuses_a_missing_or_wrong_csrf_token(patient: FlaskClient) -> None:
    link_id = share(patient, passcode="1234")
    for path, form in _every_form(patient, link_id):
        for bad in ({}, {"csrf_token": "forged"}):
            r = patient.post(path, data={**form, **bad})
            assert r.status_code == 400, path
            assert "did not come from this site" in r.get_data(as_text=True)
    r = upload(patient, "small.phr", (DATA / "small.phr").read_bytes(), csrf_token="forged")
    assert r.status_code == 400
    # Still signed in, and nothing changed.
    page = patient.get(f"/patient/links/{link_id}").get_data(as_text=True)
    assert "Active" in page and "Your record is empty" in patient.get("/patient/").get_data(
        as_text=True
    )
    # A token from another session does not work either.
    other = patient.application.test_client()
    sign_up(other)
    r = patient.post(
        f"/patient/links/{link_id}/revoke",
        data={"csrf_token": token(other, "/patient/"), "confirm": "1"},
    )
    assert r.status_code == 400


def test_upload_a_bundle_and_see_the_record(patient: FlaskClient) -> None:
    body = json.dumps(minimal_bundle("Ada Example")).encode()
    r = upload(patient, "ada.json", body, headers={"X-Requested-With": "XMLHttpRequest"})
    assert r.status_code == 200 and r.get_json() == {"redirect": "/patient/import"}
    page = patient.get("/patient/import").get_data(as_text=True)
    assert re.search(r'id="count-created">2<', page)
    record = patient.get("/patient/").get_data(as_text=True)
    assert "Ada Example" in record and "Metformin 500 mg" in record
    # A .sphr needs its password: a readable error, never a stack trace.
    r = upload(patient, "broken.sphr", b"PK\x03\x04 not really a zip")
    assert r.status_code in (400, 422) and "text/html" in r.content_type
    r = upload(patient, "empty.json", b"  ")
    assert r.status_code == 400 and "empty" in r.get_data(as_text=True)


def test_conflicts_side_by_side_and_resolved(patient: FlaskClient) -> None:
    first = minimal_bundle("Ada Example")
    second = minimal_bundle("Ada Example")
    second["entry"][1]["resource"]["medicationCodeableConcept"]["text"] = "Metformin 850 mg"
    upload(patient, "clinic-a.json", json.dumps(first).encode())
    upload(patient, "clinic-b.json", json.dumps(second).encode())
    page = patient.get("/patient/conflicts").get_data(as_text=True)
    assert "clinic-a.json" in page and "clinic-b.json" in page and "Metformin 850 mg" in page
    conflict_id = int(re.search(r'id="conflict-(\d+)"', page).group(1))
    r = patient.post(
        f"/patient/conflicts/{conflict_id}",
        data={"csrf_token": token(patient, "/patient/conflicts"), "resolution": "take-incoming"},
    )
    assert r.status_code == 303
    assert "No conflicts" in patient.get("/patient/conflicts").get_data(as_text=True)
    assert "Metformin 850 mg" in patient.get("/patient/").get_data(as_text=True)


def test_share_options_and_link_management(patient: FlaskClient) -> None:
    upload(patient, "small.phr", (DATA / "small.phr").read_bytes())
    link_id = share(
        patient,
        label="For the clinic",
        passcode="4711",
        scope="types",
        types="MedicationStatement",
        uses="n",
        max_uses="3",
        long_term="1",
        expires="7",
    )
    page = patient.get(f"/patient/links/{link_id}").get_data(as_text=True)
    shlink = re.search(r'id="share-link" type="text" readonly value="([^"]+)"', page).group(1)
    payload = decode_link(shlink)
    assert payload["flag"] == "LP" and payload["label"] == "For the clinic" and "exp" in payload
    assert "Medications" in page and "of 3" in page
    assert patient.get(f"/patient/links/{link_id}/qr.png").mimetype == "image/png"
    assert patient.get(f"/patient/links/{link_id}/qr.svg").mimetype == "image/svg+xml"

    t = token(patient, "/patient/links")
    for action, extra, state in (
        ("pause", {}, "Paused"),
        ("resume", {}, "Active"),
        ("extend", {"days": "30"}, None),
        ("passcode", {"passcode": "0000"}, None),
    ):
        r = patient.post(f"/patient/links/{link_id}/{action}", data={"csrf_token": t, **extra})
        assert r.status_code == 303, (action, r.get_data(as_text=True))
        if state:
            assert state in patient.get(f"/patient/links/{link_id}").get_data(as_text=True)
    r = patient.post(f"/patient/links/{link_id}/revoke", data={"csrf_token": t})  # box not ticked
    assert r.status_code == 400
    r = patient.post(
        f"/patient/links/{link_id}/revoke", data={"csrf_token": t, "confirm": "1", "back": "list"}
    )
    assert r.status_code == 303 and r.headers["Location"].endswith(f"/patient/links#link-{link_id}")
    assert "Revoked" in patient.get("/patient/links").get_data(as_text=True)
    assert patient.get(f"/patient/links/{link_id}/qr.png").status_code == 404
    r = patient.post(f"/patient/links/{link_id}/resume", data={"csrf_token": t})
    assert r.status_code == 409

    # Bad share forms are shown again with a message.
    t = token(patient, "/patient/share")
    for form, words in (
        ({"scope": "range"}, "start or an end"),
        ({"scope": "types"}, "at least one"),
        ({"scope": "all", "uses": "n", "max_uses": "0"}, "at least 1"),
        ({"scope": "all", "expires": "-3"}, "expiry"),
    ):
        r = patient.post("/patient/share", data={"csrf_token": t, **form})
        assert r.status_code == 400 and words in r.get_data(as_text=True), form


def test_another_account_cannot_see_or_change_links_or_records(
    app: Flask, patient: FlaskClient
) -> None:
    upload(patient, "small.phr", (DATA / "small.phr").read_bytes())
    first = json.dumps(minimal_bundle("Ada Example"))
    upload(patient, "a.json", first.replace("Metformin", "Insulin").encode())
    upload(patient, "b.json", first.encode())
    link_id = share(patient, passcode="4711")
    conflicts = patient.get("/patient/conflicts").get_data(as_text=True)
    conflict_id = re.search(r'id="conflict-(\d+)"', conflicts).group(1)

    other = app.test_client()
    sign_up(other)
    assert "Tina" not in other.get("/patient/").get_data(as_text=True)
    assert link_id not in other.get("/patient/links").get_data(as_text=True)
    assert "No conflicts" in other.get("/patient/conflicts").get_data(as_text=True)
    t = token(other, "/patient/")
    for path in ("", "/qr.png", "/qr.svg"):
        assert other.get(f"/patient/links/{link_id}{path}").status_code == 404
    for action in ("pause", "resume", "extend", "passcode", "revoke"):
        r = other.post(
            f"/patient/links/{link_id}/{action}",
            data={"csrf_token": t, "days": "7", "passcode": "1", "confirm": "1"},
        )
        assert r.status_code == 404, action
    r = other.post(
        f"/patient/conflicts/{conflict_id}", data={"csrf_token": t, "resolution": "keep-both"}
    )
    assert r.status_code == 404
    for huge in ("2147483648", "99999999999999999999"):  # past any database integer
        r = other.post(
            f"/patient/conflicts/{huge}", data={"csrf_token": t, "resolution": "keep-both"}
        )
        assert r.status_code == 404, huge
    # A link made through the API without an account is nobody's here.
    api_link = (
        app.test_client()
        .post(
            "/api/links",
            json={"files": [{"contentType": "application/fhir+json", "content": minimal_bundle()}]},
        )
        .get_json()
    )
    assert other.get(f"/patient/links/{api_link['id']}").status_code == 404

    page = patient.get(f"/patient/links/{link_id}").get_data(as_text=True)
    assert "Active" in page
    assert f'id="conflict-{conflict_id}"' in patient.get("/patient/conflicts").get_data(
        as_text=True
    )


def test_pages_need_a_session(client: FlaskClient) -> None:
    for path in (
        "/patient/",
        "/patient/share",
        "/patient/links",
        "/patient/conflicts",
        "/patient/import",
        "/patient/links/" + "x" * 43,
        "/patient/links/" + "x" * 43 + "/qr.png",
    ):
        r = client.get(path)
        assert r.status_code == 302 and r.headers["Location"].startswith("/patient/signin"), path
    r = client.get("/patient/signin")
    assert r.headers["Cache-Control"] == "no-store"
    assert "script-src 'self'" in r.headers["Content-Security-Policy"]


def _shared_resources(client: FlaskClient, link_id: str) -> set[str]:
    """What a link carries, fetched and decrypted as a recipient would."""
    page = client.get(f"/patient/links/{link_id}").get_data(as_text=True)
    shlink = re.search(r'id="share-link" type="text" readonly value="([^"]+)"', page).group(1)
    payload = decode_link(shlink)
    r = client.post(f"/shl/{link_id}", json={"recipient": "Dr Test", "embeddedLengthMax": 10**7})
    assert r.status_code == 200, r.get_data(as_text=True)
    _header, body = independent_decrypt(r.get_json()["files"][0]["embedded"], payload["key"])
    bundle = json.loads(body)
    return {
        f"{e['resource']['resourceType']}/{e['resource']['id']}"
        for e in bundle["entry"]
        if e["resource"]["resourceType"] != "Composition"
    }


def test_share_a_date_range_some_types_or_the_summary(patient: FlaskClient) -> None:
    upload(patient, "small.phr", (DATA / "small.phr").read_bytes())
    everything = _shared_resources(patient, share(patient))
    assert {"Patient/pat-1", "MedicationStatement/med-1", "Immunization/imm-1"} <= everything
    in_range = _shared_resources(
        patient, share(patient, scope="range", start="2016-01-01", end="2020-12-31")
    )
    assert "MedicationStatement/med-1" in in_range and "Observation/obs-1" in in_range
    assert "Immunization/imm-1" not in in_range and "Condition/cond-1" not in in_range
    typed = _shared_resources(patient, share(patient, scope="types", types="Immunization"))
    assert "Immunization/imm-1" in typed and "MedicationStatement/med-1" not in typed
    summary = _shared_resources(patient, share(patient, scope="summary"))
    assert "MedicationStatement/med-1" in summary and "Condition/cond-1" in summary


def test_upload_a_password_protected_sphr(patient: FlaskClient) -> None:
    import pyzipper

    buf = io.BytesIO()
    with pyzipper.AESZipFile(
        buf, "w", compression=pyzipper.ZIP_DEFLATED, encryption=pyzipper.WZ_AES
    ) as archive:
        archive.setpassword(b"s3cret-pass")
        archive.writestr("Tina.phr", (DATA / "small.phr").read_bytes())
    sphr = buf.getvalue()
    r = upload(patient, "Tina.sphr", sphr)
    assert r.status_code in (400, 401, 422) and "text/html" in r.content_type
    assert "password" in r.get_data(as_text=True).lower()
    r = upload(patient, "Tina.sphr", sphr, sphr_password="wrong-pass")
    assert r.status_code in (400, 401, 422) and "password" in r.get_data(as_text=True).lower()
    r = upload(
        patient,
        "Tina.sphr",
        sphr,
        sphr_password="s3cret-pass",
        headers={"X-Requested-With": "XMLHttpRequest"},
    )
    assert r.status_code == 200, r.get_data(as_text=True)
    page = patient.get("/patient/import").get_data(as_text=True)
    assert "Tina.sphr" in page and re.search(r'id="count-created">5<', page)
    assert "Tina Tester" in patient.get("/patient/").get_data(as_text=True)
    # An error during an XMLHttpRequest upload comes back as JSON the page can show.
    r = upload(
        patient,
        "Tina.sphr",
        sphr,
        headers={"X-Requested-With": "XMLHttpRequest", "Accept": "application/json"},
    )
    assert r.status_code >= 400 and "password" in r.get_json()["message"].lower()
