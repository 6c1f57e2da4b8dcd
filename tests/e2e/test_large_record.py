"""A large record in the browser: a .sphr with a multi-megabyte scan, uploaded through the API,
converted and encrypted a chunk at a time, served from the blob store as a stream (larger
than the embedding cap, so by location), and decrypted by Chromium with WebCrypto."""

from __future__ import annotations

import io
import json
import os
import zipfile

import pytest
import requests

from tests.e2e.conftest import Tab

pytestmark = pytest.mark.live


def noise_png(width: int, height: int) -> bytes:
    """A PNG that does not compress: every pixel random."""
    from PIL import Image

    out = io.BytesIO()
    Image.frombytes("RGB", (width, height), os.urandom(width * height * 3)).save(out, format="PNG")
    return out.getvalue()


def test_a_sphr_with_a_large_scan_opens_in_the_viewer(live_server, tab: Tab) -> None:
    scan = noise_png(1400, 1200)
    assert len(scan) > 4 * 1024 * 1024  # over EMBED_MAX_BYTES: it must come by location
    lines = [
        {"resourceType": "Patient", "id": "p1", "name": [{"family": "Scanner", "given": ["Grace"]}]},
        {"resourceType": "Media", "id": "m1", "status": "completed", "subject": {"reference": "Patient/p1"},
         "content": {"contentType": "image/png", "url": "scans/chest.png", "title": "chest.png"}},
    ]
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("record/record.phr", "\n".join(json.dumps(line) for line in lines))
        zf.writestr("record/scans/chest.png", scan, compress_type=zipfile.ZIP_STORED)
    r = requests.post(live_server.url + "/api/links", files={"file": ("grace.sphr", archive.getvalue())},
                      timeout=120)
    assert r.status_code == 201, r.text
    created = r.json()

    tab.open(created["viewer_url"])
    tab.submit()
    tab.wait_record()
    assert "Scanner" in tab.page.inner_text("body")
    img = tab.page.locator("img.attached-image")
    assert img.count() == 1 and img.get_attribute("alt") == "chest.png"
    img.evaluate("i => i.decode()")
    assert img.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [1400, 1200]
    assert tab.page_errors == [], tab.page_errors
    accesses = requests.get(f"{live_server.url}/api/links/{created['id']}/accesses", timeout=30,
                            headers={"Authorization": f"Bearer {created['management_token']}"}).json()
    assert [a["action"] for a in accesses["accesses"]][:2] == ["file", "manifest"], accesses
