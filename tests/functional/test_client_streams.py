"""shlhost.client streams files: a JWE is read into a spooled temporary file and refused as
soon as it passes the client's cap (not after it was read whole), decrypted into another,
parsed only when asked, and every temporary file is closed (no ResourceWarning: the suite
turns unraisable warnings into failures)."""

from __future__ import annotations

import gc
import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests

from shlhost import client as shl
from shlhost.crypto import jwe
from shlhost.crypto.b64 import b64url_encode
from tests.functional.conftest import new_account
from tests.functional.test_client import Scripted, link_to, ok_jose, ok_json

MiB = 1 << 20


@pytest.fixture
def remote() -> Iterator[Scripted]:
    server = Scripted()
    yield server
    server.stop()


def big_bundle(size: int) -> dict[str, Any]:
    """A Bundle of about ``size`` bytes: a Patient and a Binary with random data."""
    data = b64url_encode(os.urandom(size * 3 // 4)).replace("-", "+").replace("_", "/")
    data += "=" * (-len(data) % 4)
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {
                "fullUrl": "urn:uuid:6b1f1e1e-0000-4000-8000-000000000001",
                "resource": {"resourceType": "Patient", "name": [{"family": "Big"}]},
            },
            {
                "fullUrl": "urn:uuid:6b1f1e1e-0000-4000-8000-000000000002",
                "resource": {
                    "resourceType": "Binary",
                    "contentType": "application/octet-stream",
                    "securityContext": {
                        "reference": "urn:uuid:6b1f1e1e-0000-4000-8000-000000000001"
                    },
                    "data": data,
                },
            },
        ],
    }


def test_a_file_over_the_cap_is_refused_by_its_content_length_before_it_is_read(remote):
    key = os.urandom(32)
    token = jwe.encrypt(os.urandom(MiB), key, shl.FHIR_JSON)
    remote.routes["GET /u"] = lambda q, b: ok_jose(token)
    client = shl.ShlClient(max_file=MiB)
    with pytest.raises(shl.FileTooLarge) as refused:
        client.resolve(link_to(remote.url + "/u", b64url_encode(key), flag="U"))
    assert refused.value.kind == "file_too_large" and isinstance(refused.value, shl.ServerError)
    assert refused.value.message == "the file is larger than this client accepts (1 MiB)"
    assert shl.ShlClient().max_file == shl.MAX_FILE == 1 << 30


class Endless:
    """A server whose file has no Content-Length and would go on for ``total`` bytes; it
    counts what it managed to send before the client hung up."""

    def __init__(self, total: int) -> None:
        self.sent = 0
        self.done = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # the body ends when the connection does

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                self.send_response(200)
                self.send_header("Content-Type", "application/jose")
                self.end_headers()
                piece = b"A" * (256 * 1024)
                try:
                    while outer.sent < total:
                        self.wfile.write(piece)
                        outer.sent += len(piece)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    outer.done.set()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endless() -> Iterator[Endless]:
    server = Endless(1 << 30)
    yield server
    server.stop()


def test_a_file_without_a_length_is_refused_while_it_is_read(endless):
    client = shl.ShlClient(max_file=4 * MiB)
    with pytest.raises(shl.FileTooLarge):
        client.resolve(link_to(endless.url + "/u", b64url_encode(os.urandom(32)), flag="U"))
    assert endless.done.wait(30)
    # Socket buffers hold a few MiB more than the client read; nothing like the 1 GiB.
    assert endless.sent < 64 * MiB, f"the server sent {endless.sent / MiB:.0f} MiB"


def test_large_plaintext_is_a_file_parsed_when_asked_and_closed_with_the_result(remote):
    key = os.urandom(32)
    bundle = big_bundle(3 * MiB)
    plain = json.dumps(bundle).encode()
    token = jwe.encrypt(plain, key, shl.FHIR_JSON, deflate=True)
    remote.routes["POST /m"] = lambda q, b: ok_json(
        {"files": [{"contentType": shl.FHIR_JSON, "location": f"{remote.url}/f"}]}
    )
    remote.routes["GET /f"] = lambda q, b: ok_jose(token)
    with shl.ShlClient().resolve(link_to(remote.url + "/m", b64url_encode(key))) as resolved:
        [f] = resolved.files
        assert f.plaintext is not None and f.plaintext.tell() == 0
        assert f._content is shl._UNPARSED  # not parsed until asked
        assert f.plaintext.read() == plain
        assert f.content == bundle  # parsed from the file, which is left at 0
        assert f.plaintext.tell() == 0
        assert [r["resourceType"] for r in resolved.resources()] == ["Patient", "Binary"]
    assert f.plaintext.closed


def test_small_files_are_parsed_at_once_and_large_ones_that_are_not_json_when_asked(remote):
    key = os.urandom(32)
    small = jwe.encrypt(b"not json", key, shl.FHIR_JSON)
    large = jwe.encrypt(b"{" + b" " * (2 * MiB), key, shl.FHIR_JSON)
    remote.routes["GET /s"] = lambda q, b: ok_jose(small)
    remote.routes["GET /l"] = lambda q, b: ok_jose(large)
    client = shl.ShlClient()
    with pytest.raises(shl.DecryptionFailed, match="not JSON"):
        client.resolve(link_to(remote.url + "/s", b64url_encode(key), flag="U"))
    with (
        client.resolve(link_to(remote.url + "/l", b64url_encode(key), flag="U")) as resolved,
        pytest.raises(shl.DecryptionFailed, match="file 0 decrypts to something that is not"),
    ):
        resolved.bundle()


def test_files_already_fetched_are_closed_when_a_later_one_fails(remote):
    key = os.urandom(32)
    big = jwe.encrypt(json.dumps(big_bundle(2 * MiB)).encode(), key, shl.FHIR_JSON)
    wrong = jwe.encrypt(b"{}", os.urandom(32), shl.FHIR_JSON)
    remote.routes["POST /m"] = lambda q, b: ok_json(
        {
            "files": [
                {"contentType": shl.FHIR_JSON, "location": f"{remote.url}/big"},
                {"contentType": shl.FHIR_JSON, "location": f"{remote.url}/wrong"},
            ]
        }
    )
    remote.routes["GET /big"] = lambda q, b: ok_jose(big)
    remote.routes["GET /wrong"] = lambda q, b: ok_jose(wrong)
    with pytest.raises(shl.DecryptionFailed, match="file 1 does not decrypt"):
        shl.ShlClient().resolve(link_to(remote.url + "/m", b64url_encode(key)))
    gc.collect()  # an unclosed spool would warn here, and the warning fails the test


def test_pull_imports_a_large_bundle_from_its_file(live_server, runner):
    """Over the in-memory size, the pull reads the plaintext file with the importer's
    streaming Bundle reader: references between entries still resolve."""
    email, token = new_account(runner)
    bundle = big_bundle(2 * MiB)
    r = requests.post(
        live_server.url + "/api/links",
        json={"files": [{"contentType": shl.FHIR_JSON, "content": bundle}]},
        timeout=30,
    )
    assert r.status_code == 201, r.text
    from shlhost.cli import cli

    result = runner.invoke(cli, ["pull", r.json()["shlink"], "--account", email])
    assert result.exit_code == 0, result.output
    assert "created 2," in result.output
    web = runner.app.test_client()
    headers = {"Authorization": f"Bearer {token}"}
    [entry] = web.get("/fhir/Binary", headers=headers).get_json()["entry"]
    binary = entry["resource"]
    assert binary["data"] == bundle["entry"][1]["resource"]["data"]
    assert binary["meta"]["source"] == r.json()["url"]
    patient = web.get("/fhir/Patient", headers=headers).get_json()["entry"][0]["resource"]
    assert binary["securityContext"]["reference"] == f"Patient/{patient['id']}"
    # The small path agrees: the same link pulled again changes nothing.
    again = runner.invoke(cli, ["pull", r.json()["shlink"], "--account", email, "--force"])
    assert again.exit_code == 0, again.output
    assert "created 0, updated 0" in again.output or "nothing changed" in again.output
