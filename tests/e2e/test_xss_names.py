"""XSS through file names in the viewer: attachment titles and document descriptions are
shown as text (alt text, a sanitised download name), never as markup."""

from __future__ import annotations

import base64

import pytest

from tests.e2e.conftest import bundle, create_link, patient

pytestmark = pytest.mark.live

NAME = '"><img src=x onerror="alert(7)">.png'
DOC = "<script>alert(8)</script>letter"


def test_attachment_titles_are_text(live_server, tab):
    png = base64.b64encode(
        bytes.fromhex(
            "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
            "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
        )
    ).decode()
    record = bundle(
        patient(),
        {
            "resourceType": "Media",
            "id": "img1",
            "status": "completed",
            "content": {"contentType": "image/png", "data": png, "title": NAME},
        },
        {
            "resourceType": "DocumentReference",
            "id": "d1",
            "status": "current",
            "description": DOC,
            "content": [
                {
                    "attachment": {
                        "contentType": "application/octet-stream",
                        "title": NAME,
                        "data": base64.b64encode(b"<html><script>alert(9)</script>").decode(),
                    }
                }
            ],
        },
    )
    created = create_link(live_server, record, label=NAME)
    tab.open(created["viewer_url"])
    tab.submit()
    tab.wait_record()
    page = tab.page
    assert page.locator("img.attached-image").get_attribute("alt") == NAME
    assert page.locator("img[src='x']").count() == 0
    assert page.locator("#record script, #viewer script").count() == 0
    assert DOC in page.inner_text("#record")
    download = page.locator("a[download]").first.get_attribute("download")
    assert "<" not in download and '"' not in download
    page.wait_for_timeout(200)
    assert tab.dialogs == [] and tab.page_errors == []
