"""The clinician viewer (/view) in a real Chromium against a real gunicorn process.

Links are made through the HTTP API (or encrypted by the test itself), opened the way a
clinician would open them, and checked for what a person sees.
"""

from __future__ import annotations

import base64
import io
import json
import re
import secrets
from typing import Any

import pytest
import requests

try:
    from playwright.sync_api import expect
except ImportError:  # the browser fixture then skips, or fails in CI, saying why
    expect = None

from tests.conftest import SHARED, require
from tests.e2e.conftest import (
    TIMEOUT_MS,
    Tab,
    b64url,
    bundle,
    create_encrypted_link,
    create_link,
    encrypt_jwe,
    medication,
    new_tab,
    patient,
    sample_record,
    shlink,
    viewer_url,
)

pytestmark = pytest.mark.live


def _bearer(created: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {created['management_token']}"}


def _accesses(server: Any, created: dict[str, Any]) -> list[dict[str, Any]]:
    r = requests.get(
        f"{server.url}/api/links/{created['id']}/accesses", headers=_bearer(created), timeout=30
    )
    assert r.status_code == 200, r.text
    rows: list[dict[str, Any]] = r.json()["accesses"]
    return rows


def _table_rows(tab: Tab, caption: str) -> list[str]:
    section = tab.page.locator("section.panel", has=tab.page.locator("h3", has_text=caption))
    return [str(t) for t in section.locator("tbody tr").all_inner_texts()]


def _assert_clean(tab: Tab) -> None:
    assert tab.page_errors == [], tab.page_errors
    assert tab.dialogs == [], tab.dialogs
    csp = [m for m in tab.console_errors if "Content Security Policy" in m]
    assert csp == [], csp


def test_passcode_link_wrong_then_right_shows_the_record(live_server, tab):
    created = create_link(live_server, label="Ada's summary for the clinic", passcode="4711")
    tab.open(created["viewer_url"])
    page = tab.page
    page.locator("#access-form").wait_for(state="visible")
    assert page.inner_text("#link-label") == "Ada's summary for the clinic"
    assert "passcode required" in page.inner_text("#link-meta")
    # The passcode field has the focus, so a person can type at once and press Enter.
    assert page.evaluate("document.activeElement.id") == "passcode"
    page.keyboard.type("1234")
    page.keyboard.press("Enter")
    message = tab.message()
    assert "Wrong passcode" in message and "4 attempts left" in message
    assert page.is_visible("#passcode") and page.input_value("#passcode") == ""
    tab.screenshot("viewer-passcode.png")

    page.keyboard.type("4711")
    page.keyboard.press("Enter")
    tab.wait_record()
    assert page.is_hidden("#message")
    assert page.inner_text(".patient-name") == "Ada Lovelace"
    banner = page.inner_text(".patient")
    assert "1815-12-10" in banner and "female" in banner and "MRN-0042" in banner
    meds = _table_rows(tab, "Medications")
    assert len(meds) == 2
    assert "Metformin 500 mg tablet" in meds[0] and "1 tablet daily" in meds[0]
    assert "Lisinopril 10 mg tablet" in meds[1]
    assert "Penicillin" in _table_rows(tab, "Allergies")[0]
    assert "Type 2 diabetes mellitus" in _table_rows(tab, "Problems")[0]
    result = _table_rows(tab, "Results")[0]
    assert "Hemoglobin A1c" in result and "7.2 %" in result and "2024-02-20" in result
    tab.screenshot("viewer-record.png")
    _assert_clean(tab)

    # The owner sees both tries, by the recipient the viewer sent.
    outcomes = [(a["outcome"], a["recipient"]) for a in _accesses(live_server, created)]
    assert ("wrong_passcode", "Clinician") in outcomes and ("ok", "Clinician") in outcomes


def test_the_key_never_leaves_the_browser_and_nothing_goes_elsewhere(live_server, tab):
    created = create_link(live_server, passcode="pw")
    key = (
        created["shlink"]
        and json.loads(base64.urlsafe_b64decode(created["shlink"].split("shlink:/")[1] + "=="))[
            "key"
        ]
    )
    tab.open(created["viewer_url"])
    tab.submit(passcode="pw")
    tab.wait_record()
    tab.page.click("text=Download FHIR JSON")  # blob: URL, no request to any server
    urls = [r.url for r in tab.requests]
    assert any(u.endswith("/view") for u in urls), urls
    for request in tab.requests:
        assert request.url.startswith(live_server.url + "/") or request.url.startswith("blob:"), (
            request.url
        )
        assert "shlink" not in request.url and key not in request.url and "#" not in request.url
        assert key not in (request.post_data or "")
        assert not request.headers.get("referer"), request.headers  # Referrer-Policy: no-referrer
    manifest = [r for r in tab.requests if r.method == "POST" and "/shl/" in r.url]
    assert len(manifest) == 1
    body = json.loads(manifest[0].post_data)
    assert set(body) == {"recipient", "passcode", "embeddedLengthMax"}
    # The server's own request log never saw the payload or the key either.
    log = live_server.output()
    assert "GET /view" in log
    assert "shlink:/eyJ" not in log and key not in log  # no payload (base64 of {"...), no key


def test_locked_link_after_the_budget_is_spent(live_server, tab):
    created = create_link(live_server, passcode="right")
    for i in range(4):  # spend four of the five attempts elsewhere
        r = requests.post(
            created["url"], json={"recipient": "someone", "passcode": f"no{i}"}, timeout=30
        )
        assert r.json() == {"remainingAttempts": 4 - i}
    tab.open(created["viewer_url"])
    tab.submit(passcode="still wrong")
    message = tab.message()
    assert "No attempts left" in message and "locked" in message
    assert tab.page.is_hidden("#access-form")
    # Reloading and trying the right passcode: the server answers 404, the viewer says why.
    tab.page.reload()
    tab.submit(passcode="right")
    expect(tab.page.locator("#message-title")).not_to_be_empty(timeout=TIMEOUT_MS)
    assert "no longer available" in tab.message()
    assert "too many wrong passcodes" in tab.message()
    assert tab.page.is_hidden("#record")


def test_u_link_fetches_the_one_file_with_the_recipient(live_server, tab):
    created = create_link(live_server, flags="U", label="Direct file")
    assert "U" in created["flag"]
    tab.open(created["viewer_url"])
    tab.submit(recipient="Dr. Rivera, City Clinic")
    tab.wait_record()
    assert tab.page.inner_text(".patient-name") == "Ada Lovelace"
    gets = [r for r in tab.requests if "/shl/" in r.url]
    assert [r.method for r in gets] == ["GET"]
    assert (
        "recipient=Dr.+Rivera%2C+City+Clinic" in gets[0].url
        or "recipient=Dr.%20Rivera" in gets[0].url
    )
    accesses = _accesses(live_server, created)
    assert [(a["action"], a["recipient"]) for a in accesses] == [
        ("direct", "Dr. Rivera, City Clinic")
    ]
    # The name is remembered: the next non-passcode link opens without asking.
    other = create_link(live_server, label="Second")
    tab.open(other["viewer_url"])
    tab.wait_record()
    assert _accesses(live_server, other)[0]["recipient"] == "Dr. Rivera, City Clinic"


def test_long_term_link_without_zip_and_its_updates(live_server, tab):
    created = create_link(live_server, flags="L")
    answer = requests.post(
        created["url"], json={"recipient": "probe", "embeddedLengthMax": 10**6}, timeout=30
    ).json()
    assert answer["status"] == "can-change"
    header = json.loads(
        base64.urlsafe_b64decode(answer["files"][0]["embedded"].split(".")[0] + "==")
    )
    assert "zip" not in header  # the server emits zip-free JWE
    tab.open(created["viewer_url"])
    tab.submit()
    tab.wait_record()
    assert "long-term" in tab.page.inner_text("#link-meta")
    assert len(_table_rows(tab, "Medications")) == 2
    # The patient replaces the file; "Check for updates" shows the new content.
    file_id = created["files"][0]["id"]
    new = bundle(patient("Ada Lovelace"), medication("Atorvastatin 20 mg", "m9"))
    r = requests.put(
        f"{live_server.url}/api/links/{created['id']}/files/{file_id}",
        headers=_bearer(created),
        json={"files": [{"contentType": "application/fhir+json", "content": new}]},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    tab.page.click("text=Check for updates")
    expect(tab.page.locator("#record")).to_contain_text("Atorvastatin 20 mg", timeout=TIMEOUT_MS)
    assert len(_table_rows(tab, "Medications")) == 1


def test_zip_def_file_encrypted_elsewhere(live_server, tab):
    key = secrets.token_bytes(32)
    record = sample_record("Grace Hopper")
    jwe = encrypt_jwe(json.dumps(record).encode(), key, "application/fhir+json", deflate=True)
    created = create_encrypted_link(live_server, jwe, "application/fhir+json")
    assert created["shlink"] is None  # the server never saw the key
    tab.open(
        viewer_url(live_server, shlink(created["url"], key, label="Encrypted by the patient's app"))
    )
    tab.submit()
    tab.wait_record()
    assert tab.page.inner_text(".patient-name") == "Grace Hopper"
    _assert_clean(tab)


def _png(width: int, height: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


def test_embedded_image_and_pdf(live_server, browser, tab):
    png = base64.b64encode(_png(40, 30)).decode()
    pdf = base64.b64encode(b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n").decode()
    record = bundle(
        patient(),
        {
            "resourceType": "Media",
            "id": "img1",
            "status": "completed",
            "modality": {"text": "Wound photo"},
            "createdDateTime": "2024-01-05",
            "content": {"contentType": "image/png", "data": png, "title": "wound.png"},
        },
        {
            "resourceType": "DocumentReference",
            "id": "d1",
            "status": "current",
            "description": "Discharge letter",
            "date": "2024-01-06T10:00:00Z",
            "content": [{"attachment": {"contentType": "application/pdf", "data": pdf}}],
        },
        {
            "resourceType": "DocumentReference",
            "id": "d2",
            "status": "current",
            "description": "Evil page",
            "content": [
                {
                    "attachment": {
                        "contentType": "text/html",
                        "data": base64.b64encode(b"<script>x</script>").decode(),
                    }
                }
            ],
        },
    )
    created = create_link(live_server, record)
    tab.open(created["viewer_url"])
    tab.submit()
    tab.wait_record()
    img = tab.page.locator("img.attached-image")
    assert img.count() == 1
    assert img.get_attribute("src").startswith("blob:")
    assert img.get_attribute("alt") == "wound.png"
    # Decoded under the page's CSP (img-src blob:): the picture has its real size.
    img.evaluate("i => i.decode()")
    assert img.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [40, 30]
    assert tab.page.locator("a", has_text="Open PDF").get_attribute("href").startswith("blob:")
    html_link = tab.page.locator("a", has_text="Download text/html")
    assert html_link.get_attribute("download") and html_link.get_attribute("href").startswith(
        "blob:"
    )
    _assert_clean(tab)

    # What types the blobs carry (reading a blob: URL needs connect-src, which the real
    # policy rightly does not grant, so this look runs with the CSP bypassed).
    context, raw = new_tab(browser, bypass_csp=True)
    try:
        raw.open(created["viewer_url"])
        raw.submit()
        raw.wait_record()
        blob_type = "async (a) => (await (await fetch(a.href)).blob()).type"
        assert raw.page.locator("a", has_text="Open PDF").evaluate(blob_type) == "application/pdf"
        # HTML is never given a type that a browser would run: it is offered as a download.
        assert (
            raw.page.locator("a", has_text="Download text/html").evaluate(blob_type)
            == "application/octet-stream"
        )
    finally:
        context.close()


def test_revoked_link_shows_the_dead_link_message(live_server, tab):
    created = create_link(live_server, label="Revoked later")
    tab.open(created["viewer_url"])
    tab.submit()
    tab.wait_record()
    r = requests.delete(
        f"{live_server.url}/api/links/{created['id']}", headers=_bearer(created), timeout=30
    )
    assert r.status_code == 204
    tab.page.reload()
    tab.page.locator("#message").wait_for(state="visible")
    message = tab.message()
    assert (
        "This link is no longer available" in message
        and "Ask the patient for a new link" in message
    )
    assert tab.page.is_hidden("#record") and tab.page.is_hidden("#access-form")
    tab.screenshot("viewer-dead-link.png")


def test_wrong_key_says_the_file_cannot_be_decrypted(live_server, tab):
    created = create_link(live_server, label="Damaged key")
    tab.open(
        viewer_url(
            live_server, shlink(created["url"], secrets.token_bytes(32), label="Damaged key")
        )
    )
    tab.submit()
    message = tab.message()
    assert "could not be decrypted" in message and "key" in message
    assert tab.page.locator(".patient").count() == 0
    _assert_clean(tab)


def test_not_a_link_and_the_paste_box(live_server, tab):
    tab.open(f"{live_server.url}/view#shlink:/bm90LWpzb24")
    assert "not a SMART Health Link" in tab.message()
    tab.page.fill("#paste", "https://example.org/no-link-here")
    tab.page.press("#paste", "Enter")
    assert "not a SMART Health Link" in tab.message()
    created = create_link(live_server, label="Pasted")
    tab.page.fill("#paste", created["shlink"])
    tab.page.press("#paste", "Enter")
    tab.page.locator("#access-form").wait_for(state="visible")
    assert tab.page.evaluate("location.hash") == "#" + created["shlink"]
    assert tab.page.inner_text("#link-label") == "Pasted"
    tab.submit()
    tab.wait_record()
    assert tab.page.inner_text(".patient-name") == "Ada Lovelace"


def test_start_page_without_a_link_offers_paste_and_scan(live_server, tab):
    tab.open(f"{live_server.url}/view")
    assert tab.page.inner_text("#open-title") == "Open a link"
    assert tab.page.is_visible("#paste") and tab.page.is_visible("#scan-button")
    assert tab.page.is_hidden("#message") and tab.page.is_hidden("#access-form")
    # Nothing that belongs to a link or a running camera shows before there is one.
    assert tab.page.is_hidden("#link-info") and tab.page.is_hidden("#scan-stop")
    assert tab.page.is_hidden("#scan-video") and tab.page.is_hidden("#record")


XSS = '<img src=x onerror="alert(1)">'


def test_untrusted_text_is_shown_as_text_and_never_runs(live_server, tab):
    record = bundle(
        patient(
            "Eve Mallory",
            text={
                "status": "generated",
                "div": '<div xmlns="http://www.w3.org/1999/xhtml">NARRATIVE-MARKER'
                "<script>alert(2)</script></div>",
            },
        ),
        medication(XSS + " 5 mg", "m1"),
        {
            "resourceType": "Condition",
            "id": "c1",
            "code": {"text": "<b>bold</b><script>alert(3)</script>"},
        },
    )
    created = create_link(live_server, record, label=XSS)
    tab.open(created["viewer_url"])
    tab.submit()
    tab.wait_record()
    page = tab.page
    assert page.inner_text("#link-label") == XSS
    assert XSS + " 5 mg" in _table_rows(tab, "Medications")[0]
    assert "<b>bold</b><script>alert(3)</script>" in _table_rows(tab, "Problems")[0]
    # Had any of it become markup, there would be an <img src=x>, a <b> or a <script> here.
    assert page.locator("img[src='x']").count() == 0
    assert page.locator("#record b, #record script, #viewer script").count() == 0
    assert "NARRATIVE-MARKER" not in page.inner_text("body")
    page.wait_for_timeout(200)
    assert tab.dialogs == [] and tab.page_errors == []
    assert page.title().startswith(XSS)  # document.title is text too


def test_security_headers_and_no_inline_code(live_server):
    r = requests.get(live_server.url + "/view", timeout=30)
    assert r.status_code == 200
    csp = r.headers["Content-Security-Policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'self'"
    assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
    assert directives["connect-src"] == "*" and directives["object-src"] == "'none'"
    assert directives["frame-ancestors"] == "'none'" and directives["base-uri"] == "'none'"
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.headers["Referrer-Policy"] == "no-referrer"
    assert "camera=(self)" in r.headers["Permissions-Policy"]
    assert "Strict-Transport-Security" not in r.headers  # plain HTTP here
    # HTTPS (behind a proxy gunicorn trusts): HSTS appears.
    https = requests.get(
        live_server.url + "/view", headers={"X-Forwarded-Proto": "https"}, timeout=30
    )
    assert "max-age=" in https.headers.get("Strict-Transport-Security", "")
    # The page carries no inline script, no inline style, no style attribute.
    html = r.text
    assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", html) == []
    assert "<style" not in html and not re.search(r"\sstyle\s*=", html)
    # The data plane keeps its CORS answers next to the new headers.
    shl = requests.post(live_server.url + "/shl/" + "x" * 43, json={"recipient": "r"}, timeout=30)
    assert shl.status_code == 404
    assert (
        shl.headers["Access-Control-Allow-Origin"] == "*"
        and "Content-Security-Policy" in shl.headers
    )
    pre = requests.options(
        live_server.url + "/shl/" + "x" * 43,
        timeout=30,
        headers={"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"},
    )
    assert pre.headers["Access-Control-Allow-Origin"] == "*"


def test_phone_sized_screen_has_no_horizontal_overflow(live_server, browser):
    long_id = "X" * 120
    record = sample_record()
    record["entry"][0]["resource"]["identifier"].append(
        {"system": "urn:oid:1.2.3", "value": long_id}
    )
    created = create_link(
        live_server, record, label="A rather long label that has to wrap on a phone screen ok"
    )
    context, tab = new_tab(
        browser, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True
    )
    try:
        tab.open(created["viewer_url"])
        tab.submit()
        tab.wait_record()
        widths = tab.page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        assert widths[0] <= widths[1], widths
        # Tables turn into labelled cards: the column name is visible next to each value.
        label = tab.page.evaluate(
            "getComputedStyle(document.querySelector('table.data td'), '::before').content"
        )
        assert label.strip('"') == "Substance"  # the first table: allergies
    finally:
        context.close()


def test_keyboard_only(live_server, tab):
    created = create_link(live_server, passcode="abc")
    tab.open(created["viewer_url"])
    page = tab.page
    page.locator("#access-form").wait_for(state="visible")
    assert page.evaluate("document.activeElement.id") == "passcode"
    page.keyboard.press("Shift+Tab")
    assert page.evaluate("document.activeElement.id") == "recipient"
    page.keyboard.press("Control+A")
    page.keyboard.type("Nurse Joy")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "passcode"
    page.keyboard.type("abc")
    page.keyboard.press("Enter")
    tab.wait_record()
    assert _accesses(live_server, created)[0]["recipient"] == "Nurse Joy"


def test_smart_health_card_from_the_spec(live_server, tab):
    example = SHARED / "fixtures" / "shl-spec-example.jwe"
    require(example.is_file(), f"the spec's example JWE is not at {example} (../shared is absent)")
    key = "rxTgYlOaKJPFtcEd0qcceN8wEU4p94SqAwIWQe6uX7Q"
    created = create_encrypted_link(
        live_server, example.read_text().strip(), "application/smart-health-card"
    )
    tab.open(viewer_url(live_server, shlink(created["url"], key, label="Vaccination card")))
    tab.submit()
    tab.wait_record()
    assert (
        tab.page.inner_text(".file-title")
        == "SMART Health Card (signature not verified in the browser)"
    )
    assert tab.page.inner_text(".patient-name") == "John B. Anyperson"
    rows = _table_rows(tab, "Immunizations")
    assert len(rows) == 3 and "CVX 229" in rows[0] and "ABC General Hospital" in rows[0]
    assert "spec.smarthealth.cards/examples/issuer" in tab.page.inner_text(".card-meta")


def test_unknown_properties_and_flags_are_ignored(live_server, tab):
    created = create_link(live_server)
    key = json.loads(base64.urlsafe_b64decode(created["shlink"].split("shlink:/")[1] + "=="))["key"]
    link = shlink(
        created["url"], key, flag="LQZ", label="Future link", v=2, _ext={"x": 1}, extra="ignored"
    )
    tab.open(viewer_url(live_server, link))
    tab.submit()
    tab.wait_record()
    assert "long-term" in tab.page.inner_text("#link-meta")
    assert tab.page.inner_text(".patient-name") == "Ada Lovelace"


def test_network_error_is_explained(live_server, tab):
    from tests.conftest import free_port

    dead = f"http://127.0.0.1:{free_port()}/shl/" + b64url(secrets.token_bytes(32))
    tab.open(viewer_url(live_server, shlink(dead, secrets.token_bytes(32))))
    tab.submit()
    message = tab.message()
    assert "Could not reach 127.0.0.1" in message
    # The form stays, so the person can try again.
    assert tab.page.is_visible("#access-form")
