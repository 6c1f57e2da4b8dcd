"""Test helpers that deliberately share no code with shlhost.

``independent_decrypt`` parses a compact JWE and runs AES-256-GCM itself, so a bug in
shlhost's JWE code cannot hide behind the same bug in the check.
"""

from __future__ import annotations

import base64
import json
import zlib
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM


def b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def independent_decrypt(token: str, key_b64: str) -> tuple[dict[str, Any], bytes]:
    protected, encrypted_key, iv, ciphertext, tag = token.split(".")
    assert encrypted_key == "", "alg dir has an empty encrypted-key part"
    header = json.loads(b64d(protected))
    raw_iv = b64d(iv)
    assert len(raw_iv) == 12, "96-bit IV"
    raw_tag = b64d(tag)
    assert len(raw_tag) == 16, "128-bit tag"
    plaintext = AESGCM(b64d(key_b64)).decrypt(raw_iv, b64d(ciphertext) + raw_tag, protected.encode("ascii"))
    if header.get("zip") == "DEF":
        plaintext = zlib.decompress(plaintext, -15)
    return header, plaintext


def jwcrypto_decrypt(token: str, key_b64: str) -> bytes:
    from jwcrypto import jwe, jwk

    key = jwk.JWK(kty="oct", k=key_b64)
    obj = jwe.JWE()
    obj.deserialize(token, key=key)
    payload: bytes = obj.payload
    return payload


def decode_link(shlink: str) -> dict[str, Any]:
    """The payload of a bare or viewer-prefixed link, decoded by hand."""
    body = shlink.split("shlink:/", 1)[1]
    data: dict[str, Any] = json.loads(b64d(body))
    return data


def read_qr(png: bytes) -> list[Any]:
    """Every QR symbol zxing-cpp finds in a PNG (QR only: scanning all formats can find
    spurious 1D barcodes in the module pattern)."""
    import io

    import zxingcpp
    from PIL import Image

    found: list[Any] = zxingcpp.read_barcodes(Image.open(io.BytesIO(png)), formats=zxingcpp.BarcodeFormat.QRCode)
    return found


def minimal_bundle(name: str = "Ada Example") -> dict[str, Any]:
    given, family = name.split(" ", 1)
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"resource": {"resourceType": "Patient", "id": "p1", "name": [{"family": family, "given": [given]}]}},
            {"resource": {"resourceType": "MedicationStatement", "id": "m1", "status": "active",
                          "subject": {"reference": "Patient/p1"},
                          "medicationCodeableConcept": {"text": "Metformin 500 mg"}}},
        ],
    }
