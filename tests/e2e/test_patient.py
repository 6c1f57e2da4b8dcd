"""The patient pages (/patient) in a real Chromium against a real gunicorn process.

A patient signs up, uploads a record, shares it with a passcode, downloads the QR code;
a clinician in another browser context opens the link; the patient sees the access and
revokes; another account sees none of it.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests

try:
    from playwright.sync_api import expect
except ImportError:  # the browser fixture then skips, or fails in CI, saying why
    expect = None

from tests.conftest import DATA
from tests.e2e.conftest import Tab, new_tab
from tests.helpers import decode_link, read_qr

pytestmark = pytest.mark.live

PASSWORD = "correct horse battery"


def _assert_clean(tab: Tab) -> None:
    assert tab.page_errors == [], tab.page_errors
    csp = [m for m in tab.console_errors if "Content Security Policy" in m]
    assert csp == [], csp


def sign_up(tab: Tab, base: str) -> str:
    email = f"patient-{uuid.uuid4().hex[:10]}@example.org"
    page = tab.page
    tab.open(base + "/patient/signup")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_label("Password again").fill(PASSWORD)
    page.click("#signup-button")
    page.wait_for_url(re.compile(r"/patient/$"))
    assert email in page.inner_text(".patient-nav")
    return email


def _cookie(context: Any) -> dict[str, Any]:
    return next(c for c in context.cookies() if c["name"] == "session")


def test_patient_shares_a_record_and_revokes_it(live_server, browser, tab):
    base = live_server.url
    page = tab.page
    email = sign_up(tab, base)
    cookie = _cookie(page.context)
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax" and not cookie["secure"]  # http here

    # Sign out and back in: a new session each time.
    page.click("#signout-button")
    page.wait_for_url(re.compile(r"/patient/signin"))
    assert "You are signed out" in page.inner_text("main")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill("not the password")
    page.click("#signin-button")
    assert "do not match" in page.inner_text("#form-error")
    page.get_by_label("Password").fill(PASSWORD)
    page.click("#signin-button")
    page.wait_for_url(re.compile(r"/patient/$"))
    assert _cookie(page.context)["value"] != cookie["value"]

    # Upload: the XMLHttpRequest path with its progress bar, then the summary.
    assert "Your record is empty" in page.inner_text("#empty-record")
    page.set_input_files("#file", str(DATA / "small.phr"))
    page.click("#upload-button")
    page.wait_for_url(re.compile(r"/patient/import$"))
    assert page.inner_text("#count-created") == "5"
    assert page.inner_text("#count-errors") == "1"
    assert "line 4: not valid JSON" in page.inner_text(".issues")
    page.click("text=View my record")
    page.wait_for_url(re.compile(r"/patient/$"))
    assert page.inner_text(".patient-name") == "Tina Tester"
    assert "Lisinopril 10 mg" in page.inner_text("#medications")
    assert "Hypertension" in page.inner_text("#problems")
    assert "Influenza" in page.inner_text("#immunizations")
    assert "150 mmHg" in page.inner_text("#results")
    timeline = page.locator(".timeline li").all_inner_texts()
    assert timeline[0].startswith("2021-10-01") and "Influenza" in timeline[0]
    tab.screenshot("patient-record.png")

    # Share with a passcode.
    page.click("nav >> text=Share")
    page.get_by_label("Name for this link").fill("For Dr. Rivera")
    page.check("#scope-all")
    page.get_by_label("Passcode (recommended)").fill("4711")
    page.select_option("#expires", "30")
    page.click("#share-button")
    page.wait_for_url(re.compile(r"/patient/links/[\w-]{43}\?created=1$"))
    link_id = page.url.split("/links/")[1].split("?")[0]
    link_text = page.input_value("#share-link")
    assert link_text.startswith(base + "/view#shlink:/")
    payload = decode_link(link_text)
    assert payload["url"] == f"{base}/shl/{link_id}" and "P" in payload["flag"]
    assert page.locator("#qr").evaluate("img => img.complete && img.naturalWidth > 100")
    page.click("#copy-link")
    expect(page.locator("#copy-status")).to_have_text("Copied.")
    tab.screenshot("patient-share.png")

    # Download the PNG the way a person does, and decode it.
    with page.expect_download() as info:
        page.click("#download-png")
    download = info.value
    assert download.suggested_filename == "health-link-qr.png"
    png = Path(download.path()).read_bytes()
    symbols = read_qr(png)
    assert [s.text for s in symbols] == [link_text]
    with page.expect_download() as info:
        page.click("#download-svg")
    assert info.value.suggested_filename == "health-link-qr.svg"

    # The clinician: another browser context, wrong then right passcode.
    context, doctor = new_tab(browser, viewport={"width": 1000, "height": 800})
    try:
        doctor.open(link_text)
        doctor.submit(recipient="Dr. Rivera", passcode="0000")
        assert "Wrong passcode" in doctor.message()
        doctor.page.fill("#passcode", "4711")
        doctor.page.press("#passcode", "Enter")
        doctor.wait_record()
        assert doctor.page.inner_text(".patient-name") == "Tina Tester"
        meds = doctor.page.locator(
            "section.panel", has=doctor.page.locator("h3", has_text="Medications")
        )
        assert "Lisinopril 10 mg" in meds.locator("tbody").inner_text()

        # The patient sees both tries in the log, then revokes.
        page.click("nav >> text=My links")
        page.wait_for_url(re.compile(r"/patient/links$"))
        card = page.locator(f"#link-{link_id}")
        assert "Active" in card.locator(".state").inner_text()
        log = card.locator(".access-log tbody tr").all_inner_texts()
        assert any("Dr. Rivera" in row and "Opened" in row for row in log), log
        assert any("Dr. Rivera" in row and "Wrong passcode" in row for row in log), log
        tab.screenshot("patient-links.png")
        card.locator("button[data-action=revoke]").click()  # the box is not ticked: nothing happens
        assert page.url.endswith("/patient/links")
        card.get_by_label("For good: nobody can open it again").check()
        with page.expect_navigation():
            card.locator("button[data-action=revoke]").click()
        assert page.url.endswith(f"/patient/links#link-{link_id}")
        assert "Revoked" in page.locator(f"#link-{link_id} .state").inner_text()

        doctor.page.reload()
        doctor.submit(recipient="Dr. Rivera", passcode="4711")
        assert "This link is no longer available" in doctor.message()
        _assert_clean(doctor)
    finally:
        context.close()

    # The QR routes of a revoked link answer 404 for its owner too.
    assert page.request.get(f"{base}/patient/links/{link_id}/qr.png").status == 404
    _assert_clean(tab)

    # Another account sees nothing of the first one's.
    context, other = new_tab(browser)
    try:
        sign_up(other, base)
        assert "Your record is empty" in other.page.inner_text("#empty-record")
        other.open(base + "/patient/links")
        assert other.page.locator(".link-card").count() == 0
        assert "not shared anything" in other.page.inner_text("#no-links")
        token = other.page.locator("input[name=csrf_token]").first.get_attribute("value")
        for path in ("", "/qr.png", "/qr.svg"):
            r = other.page.request.get(f"{base}/patient/links/{link_id}{path}")
            assert r.status == 404, path
        other.open(f"{base}/patient/links/{link_id}")
        assert "Not found" in other.page.inner_text("h1")
        r = other.page.request.post(
            f"{base}/patient/links/{link_id}/resume", form={"csrf_token": token}
        )
        assert r.status == 404
        _assert_clean(other)
    finally:
        context.close()
    # The first patient's link is untouched by the other's attempt.
    r = requests.get(f"{base}/patient/links/{link_id}", timeout=30)
    assert r.url.startswith(f"{base}/patient/signin")  # no session: sign in first
    page.goto(f"{base}/patient/links/{link_id}")
    assert "Revoked" in page.inner_text("#link-state")
