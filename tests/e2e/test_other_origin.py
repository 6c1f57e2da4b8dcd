"""The viewer is a viewer for any SHL server, not only for the one that serves it.

A tiny SHL server on another port (another origin) serves a manifest whose file is a
``location`` URL holding a ``zip: DEF`` JWE; the viewer is loaded from the live server.
The browser enforces CORS between the two, exactly as it would between two hosts.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.e2e.conftest import b64url, encrypt_jwe, sample_record, shlink, viewer_url

pytestmark = pytest.mark.live


class OtherShlServer:
    def __init__(self, jwe: str, passcode: str | None = None) -> None:
        self.jwe = jwe
        self.passcode = passcode
        self.seen: list[tuple[str, str, dict[str, Any] | None]] = []
        self.link_path = "/m/" + b64url(secrets.token_bytes(32))
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(
                self, status: int, body: bytes = b"", content_type: str = "application/json"
            ) -> None:
                self.send_response(status)
                self.send_header("Access-Control-Allow-Origin", "*")
                self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
                self.send_header("Access-Control-Allow-Headers", "Content-Type")
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_OPTIONS(self) -> None:  # noqa: N802 - http.server's naming
                outer.seen.append(("OPTIONS", self.path, None))
                self._send(204)

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(
                    self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}"
                )
                outer.seen.append(("POST", self.path, body))
                if self.path != outer.link_path:
                    self._send(404, b'{"error":"not_found"}')
                elif outer.passcode is not None and body.get("passcode") != outer.passcode:
                    self._send(401, b'{"remainingAttempts":2}')
                else:
                    host = self.headers["Host"]
                    manifest = {
                        "status": "finalized",
                        "files": [
                            {
                                "contentType": "application/fhir+json",
                                "location": f"http://{host}/files/1?ticket=abc",
                            }
                        ],
                    }
                    self._send(200, json.dumps(manifest).encode())

            def do_GET(self) -> None:  # noqa: N802
                outer.seen.append(("GET", self.path, None))
                if urlsplit(self.path).path == "/files/1" and parse_qs(
                    urlsplit(self.path).query
                ).get("ticket"):
                    self._send(200, outer.jwe.encode(), "application/jose")
                else:
                    self._send(404, b'{"error":"not_found"}')

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def other_server() -> Iterator[tuple[OtherShlServer, bytes]]:
    key = secrets.token_bytes(32)
    jwe = encrypt_jwe(
        json.dumps(sample_record("Katherine Johnson")).encode(),
        key,
        "application/fhir+json",
        deflate=True,
    )
    server = OtherShlServer(jwe, passcode="orbit")
    yield server, key
    server.stop()


def test_viewer_opens_a_link_hosted_by_another_server(live_server, tab, other_server):
    server, key = other_server
    link = shlink(server.url + server.link_path, key, flag="P", label="From another host")
    tab.open(viewer_url(live_server, link))
    assert f"From {server.url.removeprefix('http://')}" in tab.page.inner_text("#link-meta")
    tab.submit(passcode="nope", recipient="Dr. Cross")
    assert "2 attempts left" in tab.message()
    tab.page.fill("#passcode", "orbit")
    tab.page.press("#passcode", "Enter")
    tab.wait_record()
    assert tab.page.inner_text(".patient-name") == "Katherine Johnson"
    assert (
        len(tab.page.locator("section.panel", has_text="Medications").locator("tbody tr").all())
        == 2
    )

    methods = [m for m, _, _ in server.seen]
    assert "OPTIONS" in methods  # a real cross-origin preflight happened
    posts = [body for m, _, body in server.seen if m == "POST"]
    assert posts[-1] == {"recipient": "Dr. Cross", "passcode": "orbit", "embeddedLengthMax": 262144}
    assert ("GET", "/files/1?ticket=abc", None) in server.seen  # the location file
    # Only the two servers were contacted; the key went to neither.
    key_text = b64url(key)
    for request in tab.requests:
        assert request.url.startswith((live_server.url + "/", server.url + "/")), request.url
        assert key_text not in request.url and key_text not in (request.post_data or "")


def test_other_server_without_cors_gives_a_clear_message(live_server, tab):
    """A server that does not allow other origins: the browser blocks it; the viewer says so."""

    class NoCors(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_OPTIONS(self) -> None:  # noqa: N802
            self.send_response(204)
            self.end_headers()

        def do_POST(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"files":[]}')

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), NoCors)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/m/" + b64url(secrets.token_bytes(32))
        tab.open(viewer_url(live_server, shlink(url, secrets.token_bytes(32))))
        tab.submit()
        message = tab.message()
        assert "Could not reach" in message and "CORS" in message
    finally:
        httpd.shutdown()
        httpd.server_close()
