"""Scanning a QR code with the camera: Chromium's fake camera plays a video of the QR.

The QR is the server's own ``qr.png?viewer=1`` (the image a patient prints or shows); the
vendored jsQR decoder in the page must find it in the camera frames and open the link.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.e2e.conftest import create_link, launch, new_tab

pytestmark = pytest.mark.live

WIDTH, HEIGHT = 640, 480


def write_y4m(path: Path, png: bytes) -> None:
    """A few frames of YUV 4:2:0 video showing the PNG (a QR code) on white."""
    from PIL import Image

    code = Image.open(io.BytesIO(png)).convert("L")
    if code.height > HEIGHT - 20 or code.width > WIDTH - 20:
        code.thumbnail((WIDTH - 20, HEIGHT - 20), Image.LANCZOS)
    scale = min((HEIGHT - 20) // code.height, (WIDTH - 20) // code.width) or 1
    code = code.resize((code.width * scale, code.height * scale), Image.NEAREST)
    frame = Image.new("L", (WIDTH, HEIGHT), 255)
    frame.paste(code, ((WIDTH - code.width) // 2, (HEIGHT - code.height) // 2))
    luma = frame.tobytes()
    chroma = bytes([128]) * ((WIDTH // 2) * (HEIGHT // 2))
    with path.open("wb") as out:
        out.write(f"YUV4MPEG2 W{WIDTH} H{HEIGHT} F10:1 Ip A1:1 C420jpeg\n".encode())
        for _ in range(3):
            out.write(b"FRAME\n" + luma + chroma + chroma)


@pytest.fixture
def camera_link(live_server: Any, tmp_path: Path) -> tuple[dict[str, Any], Path]:
    created = create_link(live_server, label="Scanned at the front desk")
    qr = requests.get(
        f"{live_server.url}{created['qr']['png']}?viewer=1",
        headers={"Authorization": f"Bearer {created['management_token']}"},
        timeout=30,
    )
    assert qr.status_code == 200 and qr.headers["Content-Type"] == "image/png"
    video = tmp_path / "qr.y4m"
    write_y4m(video, qr.content)
    return created, video


@pytest.fixture
def camera_browser(playwright_api: Any, camera_link: tuple[dict[str, Any], Path]) -> Iterator[Any]:
    _created, video = camera_link
    instance = launch(
        playwright_api,
        [
            "--use-fake-device-for-media-stream",
            "--use-fake-ui-for-media-stream",
            f"--use-file-for-fake-video-capture={video}",
        ],
    )
    yield instance
    instance.close()


def test_scan_a_qr_code_with_the_camera(live_server, camera_link, camera_browser):
    created, _video = camera_link
    context, tab = new_tab(camera_browser)
    try:
        context.grant_permissions(["camera"], origin=live_server.url)
        tab.open(live_server.url + "/view")
        tab.page.click("#scan-button")
        tab.page.locator("#access-form").wait_for(state="visible")
        assert tab.page.inner_text("#link-label") == "Scanned at the front desk"
        assert tab.page.evaluate("location.hash") == "#" + created["shlink"]
        # The camera is off again once the link is found.
        assert tab.page.is_hidden("#scan-video")
        assert tab.page.evaluate("document.querySelector('#scan-video').srcObject") is None
        # The decoder was loaded from this server, on demand.
        assert any(r.url == live_server.url + "/static/vendor/jsQR.js" for r in tab.requests)
        assert tab.page_errors == []
    finally:
        context.close()
