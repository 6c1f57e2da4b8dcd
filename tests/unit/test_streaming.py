"""Large files stream: the compact JWE is written and read a chunk at a time, records become
Bundles a resource at a time, and none of it holds a copy of the payload in memory.

Every token made here is opened by an independent code path (AES-GCM over the whole token
in the test) and by jwcrypto; memory is traced with tracemalloc, which counts every Python
allocation (the bytes that cryptography and pybase64 hand back included), so the bounds
below are exact properties, not timings."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import tempfile
import tracemalloc
import zipfile
from collections.abc import Callable
from typing import IO, Any

import pytest

from shlhost.crypto import jwe
from shlhost.crypto.b64 import b64url_encode
from shlhost.errors import BadRequest, DecryptionError
from shlhost.phr.formats import FHIR_JSON, SHC, prepare_upload
from tests.helpers import independent_decrypt, jwcrypto_decrypt

MiB = 1 << 20


@pytest.fixture
def key() -> bytes:
    return os.urandom(32)


def encrypt_bytes(plaintext: bytes, key: bytes, **kw: Any) -> str:
    out = io.BytesIO()
    written = jwe.encrypt_stream(io.BytesIO(plaintext), out, key, FHIR_JSON, **kw)
    assert written == len(out.getvalue())
    return out.getvalue().decode("ascii")


@pytest.mark.parametrize("size", [1, 2, 3, jwe.CHUNK - 1, jwe.CHUNK, jwe.CHUNK + 1, 3 * jwe.CHUNK + 2])
def test_stream_encryption_at_every_chunk_boundary_opens_independently(key: bytes, size: int) -> None:
    plaintext = os.urandom(size)
    token = encrypt_bytes(plaintext, key)
    header, opened = independent_decrypt(token, b64url_encode(key))
    assert opened == plaintext
    assert header == {"alg": "dir", "enc": "A256GCM", "cty": FHIR_JSON}
    assert jwcrypto_decrypt(token, b64url_encode(key)) == plaintext
    out = io.BytesIO()
    assert jwe.decrypt_stream(io.BytesIO(token.encode()), out, key) == header
    assert out.getvalue() == plaintext


@pytest.mark.parametrize("size", [10, jwe.CHUNK * 2 + 7])
def test_stream_deflate_round_trips_and_opens_independently(key: bytes, size: int) -> None:
    plaintext = (b'{"resourceType":"Observation","valueQuantity":{"value":%d}}\n' * size)[:size * 3]
    token = encrypt_bytes(plaintext, key, deflate=True)
    header, opened = independent_decrypt(token, b64url_encode(key))
    assert header["zip"] == "DEF" and opened == plaintext
    assert jwe.decrypt(token, key)[1] == plaintext


def test_empty_source_is_refused_before_anything_is_written(key: bytes) -> None:
    out = io.BytesIO()
    with pytest.raises(ValueError, match="nothing to encrypt"):
        jwe.encrypt_stream(io.BytesIO(b""), out, key, FHIR_JSON)
    assert out.getvalue() == b""


def test_check_and_copy_a_token_with_surrounding_whitespace(key: bytes) -> None:
    token = encrypt_bytes(os.urandom(5000), key)
    src = io.BytesIO(b"\n  " + token.encode() + b"\r\n\n")
    parsed = jwe.check_stream(src, expected_cty=FHIR_JSON)
    out = io.BytesIO()
    assert jwe.copy_token(src, parsed, out) == len(token)
    assert out.getvalue().decode() == token


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda t: t[:-40] + "." + t[-39:], "five dot-separated parts"),  # a sixth part
        (lambda t: t[:200] + "+" + t[201:], "not base64url"),  # base64, not base64url
        (lambda t: t[:200] + "=" + t[201:], "not base64url"),
        (lambda t: t.rsplit(".", 1)[0] + "." + t.rsplit(".", 1)[1][:10], "128-bit tag"),
        (lambda t: t.split(".", 1)[0], "five dot-separated parts"),
    ],
)
def test_check_stream_refuses_a_broken_upload(key: bytes, mangle: Callable[[str], str], reason: str) -> None:
    token = mangle(encrypt_bytes(os.urandom(3 * jwe.CHUNK), key))
    with pytest.raises(BadRequest, match=reason) as caught:
        jwe.check_stream(io.BytesIO(token.encode()))
    assert caught.value.code == "invalid_jwe"


def test_decrypt_stream_refuses_tampering_and_a_wrong_key(key: bytes) -> None:
    token = bytearray(encrypt_bytes(os.urandom(2 * jwe.CHUNK), key).encode())
    with pytest.raises(DecryptionError, match="does not decrypt"):
        jwe.decrypt_stream(io.BytesIO(bytes(token)), io.BytesIO(), os.urandom(32))
    middle = len(token) // 2
    token[middle] = ord("A") if token[middle] != ord("A") else ord("B")
    with pytest.raises(DecryptionError, match="does not decrypt"):
        jwe.decrypt_stream(io.BytesIO(bytes(token)), io.BytesIO(), key)


def test_zip_bomb_is_capped_while_streaming_and_a_wrong_key_still_reads_as_one(key: bytes) -> None:
    token = encrypt_bytes(b"\0" * (8 * MiB), key, deflate=True)
    with pytest.raises(DecryptionError, match="larger than allowed"):
        jwe.decrypt_stream(io.BytesIO(token.encode()), io.BytesIO(), key, max_inflated=MiB)
    with pytest.raises(DecryptionError, match="does not decrypt"):
        jwe.decrypt_stream(io.BytesIO(token.encode()), io.BytesIO(), os.urandom(32), max_inflated=MiB)


# -- memory: file to file, a constant few chunks whatever the size ------------------------


def traced_peak(work: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        work()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def spooled(data: bytes) -> IO[bytes]:
    fh = tempfile.TemporaryFile()  # noqa: SIM115 - returned
    fh.write(data)
    fh.seek(0)
    return fh


def test_encrypting_and_decrypting_32_mib_file_to_file_holds_no_copy(key: bytes) -> None:
    size = 32 * MiB
    with spooled(os.urandom(size)) as src, tempfile.TemporaryFile() as token, tempfile.TemporaryFile() as back:
        peak_encrypt = traced_peak(lambda: jwe.encrypt_stream(src, token, key, FHIR_JSON))
        token.seek(0)
        peak_decrypt = traced_peak(lambda: jwe.decrypt_stream(token, back, key))
        assert peak_encrypt < 2 * MiB and peak_decrypt < 2 * MiB, (peak_encrypt, peak_decrypt)
        src.seek(0)
        back.seek(0)
        assert hashlib.sha256(back.read()).digest() == hashlib.sha256(src.read()).digest()
        token.seek(0)
        parsed = jwe.check_stream(token)
        assert parsed.ct_length == -(-size * 4 // 3)  # unpadded base64url of the ciphertext


def sphr_with_image(image: bytes) -> bytes:
    """A .sphr whose DocumentReference points at a large stored (incompressible) image."""
    lines = [
        {"resourceType": "Patient", "id": "p1", "name": [{"family": "Big"}]},
        {"resourceType": "DocumentReference", "id": "d1", "subject": {"reference": "Patient/p1"},
         "content": [{"attachment": {"contentType": "image/png", "url": "scan.png", "title": "chest"}}]},
        {"resourceType": "Patient", "id": "p1", "name": [{"family": "Big"}]},  # an exact repeat
    ]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("record/record.phr", "\n".join(json.dumps(line) for line in lines))
        zf.writestr("record/scan.png", image, compress_type=zipfile.ZIP_STORED)
        zf.writestr("record/notes.txt", b"kept as a Binary")
    return buf.getvalue()


def test_sphr_becomes_a_bundle_streaming_its_attachments() -> None:
    image = os.urandom(24 * MiB)
    with spooled(sphr_with_image(image)) as upload:
        prepared: list[Any] = []
        peak = traced_peak(lambda: prepared.append(prepare_upload("big.sphr", upload, max_size=64 * MiB)))
        assert peak < 2 * MiB, peak
        (made,) = prepared
        bundle = json.loads(made.source.read())
        made.close()
    assert made.content_type == FHIR_JSON and bundle["type"] == "collection"
    resources = [e["resource"] for e in bundle["entry"]]
    assert [r["resourceType"] for r in resources] == ["Patient", "DocumentReference", "Binary"]
    attachment = resources[1]["content"][0]["attachment"]
    assert base64.b64decode(attachment["data"]) == image
    assert attachment["size"] == len(image) and "url" not in attachment
    assert attachment["contentType"] == "image/png" and attachment["title"] == "chest"
    assert base64.b64decode(resources[2]["data"]) == b"kept as a Binary"
    assert resources[2]["contentType"] == "text/plain"


def test_ndjson_becomes_a_bundle_one_resource_at_a_time() -> None:
    lines = b"".join(
        json.dumps({"resourceType": "Observation", "id": f"o{i}", "note": [{"text": "x" * 200}]}).encode() + b"\n"
        for i in range(40_000)
    )
    assert len(lines) > 9 * MiB
    with spooled(lines) as upload:
        prepared: list[Any] = []
        peak = traced_peak(lambda: prepared.append(prepare_upload("r.ndjson", upload, max_size=64 * MiB)))
        (made,) = prepared
        bundle = json.loads(made.source.read())
        made.close()
    # A digest per resource to drop repeats is the only thing that grows (about 100 bytes each).
    assert peak < 8 * MiB, peak
    assert [e["resource"]["id"] for e in bundle["entry"]] == [f"o{i}" for i in range(40_000)]


def test_a_json_upload_that_is_utf8_already_is_encrypted_as_it_came() -> None:
    card = b'  {"verifiableCredential": ["a.b.c"]}\n'
    made = prepare_upload("x.smart-health-card", io.BytesIO(card), max_size=MiB)
    assert made.content_type == SHC and made.source.read() == card
    bom = "\ufeff" + json.dumps({"resourceType": "Patient", "id": "é"})
    made = prepare_upload("p.json", io.BytesIO(bom.encode("utf-8")), max_size=MiB)
    assert json.loads(made.source.read()) == {"resourceType": "Patient", "id": "é"}
