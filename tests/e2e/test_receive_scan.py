"""The receive page scans a QR code with the camera into its link field (Chromium's fake
camera plays the server's own QR PNG; the decoder is the vendored jsQR, shared with the
viewer through static/qrscan.js)."""

from __future__ import annotations

import time

import pytest

from tests.e2e.conftest import new_tab
from tests.e2e.test_patient import sign_up
from tests.e2e.test_scan import camera_browser, camera_link  # noqa: F401 - fixtures

pytestmark = pytest.mark.live


def test_scan_fills_the_link_and_the_form_posts_it(live_server, camera_link, camera_browser):  # noqa: F811
    created, _video = camera_link
    context, tab = new_tab(camera_browser)
    try:
        context.grant_permissions(["camera"], origin=live_server.url)
        sign_up(tab, live_server.url)
        tab.open(live_server.url + "/patient/receive/")
        tab.page.click("#scan-button")
        for _ in range(150):  # polled from here: the page's CSP (rightly) forbids eval
            if "shlink:/" in tab.page.input_value("#link"):
                break
            time.sleep(0.1)
        assert tab.page.input_value("#link") == created["viewer_url"]
        assert tab.page.is_hidden("#scan-video")  # the camera is off once a link is found
        assert tab.page.evaluate("document.activeElement.id") == "passcode"
        assert any(r.url == live_server.url + "/static/vendor/jsQR.js" for r in tab.requests)
        # This live server refuses to pull from private addresses (its own, here): the form
        # posts the scanned link and answers with a readable refusal, not a crash.
        tab.page.click("#receive-form button[type=submit]")
        tab.page.locator("#receive-error").wait_for(state="visible")
        assert "could not be read" in tab.page.inner_text("#receive-error")
        assert tab.page_errors == []
    finally:
        context.close()
