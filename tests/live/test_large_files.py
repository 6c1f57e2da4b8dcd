"""Large records through a real gunicorn server: a 50 MB .sphr uploaded, turned into a Bundle,
encrypted, and fetched back through a manifest location, opened by jwcrypto and by an
independent AES-GCM; and bodies over the limit refused before they are read whole."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import select
import socket
import time
import zipfile
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.conftest import LiveServer
from tests.helpers import independent_decrypt, jwcrypto_decrypt

pytestmark = pytest.mark.live

MiB = 1 << 20


@pytest.fixture(scope="module")
def server(base_config: dict[str, Any]) -> Iterator[LiveServer]:
    """Uploads up to 80 MiB; JWEs up to 1 MiB embedded."""
    with LiveServer({**base_config, "MAX_CONTENT_LENGTH": 80 * MiB}, workers=1, threads=4) as live:
        yield live


def big_sphr(image: bytes) -> bytes:
    lines = [
        {"resourceType": "Patient", "id": "p1", "name": [{"family": "Large", "given": ["Ada"]}]},
        {"resourceType": "DocumentReference", "id": "scan", "subject": {"reference": "Patient/p1"},
         "content": [{"attachment": {"contentType": "application/dicom", "url": "images/ct.dcm"}}]},
    ]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("export/record.phr", "\n".join(json.dumps(line) for line in lines) + "\n")
        zf.writestr("export/images/ct.dcm", image, compress_type=zipfile.ZIP_STORED)
    return buf.getvalue()


@pytest.mark.slow
def test_a_50_mb_sphr_goes_through_and_decrypts_with_jwcrypto_and_by_hand(server: LiveServer) -> None:
    image = os.urandom(50 * MiB)
    upload = big_sphr(image)
    assert len(upload) > 50 * MiB
    r = requests.post(server.url + "/api/links", files={"file": ("big.sphr", upload)},
                      data={"label": "CT scan"}, timeout=300)
    assert r.status_code == 201, r.text[:500]
    created = r.json()
    key = created["shlink"] and json.loads(base64.urlsafe_b64decode(
        created["shlink"].split("shlink:/", 1)[1] + "=="))["key"]
    manifest = requests.post(created["url"], json={"recipient": "radiology", "embeddedLengthMax": 10**9},
                             timeout=60).json()
    [entry] = manifest["files"]
    assert "embedded" not in entry, "a 67 MB JWE is never embedded, whatever the client asks"
    served = requests.get(entry["location"], timeout=300)
    assert served.status_code == 200 and served.headers["Content-Type"] == "application/jose"
    token = served.text
    assert int(served.headers["Content-Length"]) == len(token) == created["files"][0]["size"]
    del served, upload

    header, plaintext = independent_decrypt(token, key)
    assert header == {"alg": "dir", "enc": "A256GCM", "cty": "application/fhir+json"}
    assert jwcrypto_decrypt(token, key) == plaintext
    bundle = json.loads(plaintext)
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "collection"
    [patient, document] = [e["resource"] for e in bundle["entry"]]
    assert patient["name"][0]["family"] == "Large"
    attachment = document["content"][0]["attachment"]
    assert attachment["size"] == len(image) and attachment["contentType"] == "application/dicom"
    assert hashlib.sha256(base64.b64decode(attachment["data"])).digest() == hashlib.sha256(image).digest()


def _send_head(sock: socket.socket, host: str, headers: dict[str, str], boundary: str) -> None:
    lines = ["POST /api/links HTTP/1.1", f"Host: {host}",
             f"Content-Type: multipart/form-data; boundary={boundary}", "Connection: close",
             *(f"{k}: {v}" for k, v in headers.items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())


def _answer(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    raw = b""
    sock.settimeout(30)
    while b"\r\n\r\n" not in raw or len(raw.split(b"\r\n\r\n", 1)[1]) < 2:
        piece = sock.recv(65536)
        if not piece:
            break
        raw += piece
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    end = body.rfind(b"}")
    return status, json.loads(body[body.find(b"{"):end + 1]) if end >= 0 else {}


def _part_head(boundary: str) -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.sphr\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()


def test_a_body_announced_over_the_limit_is_refused_before_it_is_sent(server: LiveServer) -> None:
    """Content-Length says 2 GB: the answer (413) comes after a few kilobytes."""
    host = server.url.split("//", 1)[1]
    with socket.create_connection(tuple(host.split(":")), timeout=30) as sock:  # type: ignore[arg-type]
        _send_head(sock, host, {"Content-Length": str(2 << 30)}, "b0undary")
        sock.sendall(_part_head("b0undary") + os.urandom(64 * 1024))
        status, body = _answer(sock)
    assert status == 413 and body["error"] == "request_entity_too_large", body


def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit(server: LiveServer) -> None:
    """No length announced: the server counts while it reads and answers 413 once it has
    read past the limit (80 MiB), long before the 400 MiB this client would send."""
    host = server.url.split("//", 1)[1]
    sent = 0
    with socket.create_connection(tuple(host.split(":")), timeout=30) as sock:  # type: ignore[arg-type]
        _send_head(sock, host, {"Transfer-Encoding": "chunked"}, "b0undary")
        first = _part_head("b0undary")
        sock.sendall(b"%x\r\n%s\r\n" % (len(first), first))
        piece = os.urandom(MiB)
        deadline = time.monotonic() + 120
        while sent < 400 * MiB and time.monotonic() < deadline:
            if select.select([sock], [], [], 0)[0]:
                break  # the server has answered
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(piece)
        status, body = _answer(sock)
    assert status == 413 and body["error"] == "request_entity_too_large", body
    assert 80 * MiB <= sent < 160 * MiB, f"sent {sent / MiB:.0f} MiB before the answer"
