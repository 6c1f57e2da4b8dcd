"""Compact JWE as SMART Health Links use it: ``alg: dir``, ``enc: A256GCM``, optional ``zip: DEF``.

    BASE64URL(header) . "" . BASE64URL(iv) . BASE64URL(ciphertext) . BASE64URL(tag)

The AAD is the ASCII of the encoded protected header (RFC 7516, 5.1 step 14).
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shlhost.crypto.b64 import b64url_decode, b64url_encode
from shlhost.errors import BadRequest, DecryptionError

KEY_BYTES = 32
IV_BYTES = 12
TAG_BYTES = 16


@dataclass(frozen=True)
class ParsedJwe:
    header: dict[str, Any]
    protected: str
    iv: bytes
    ciphertext: str  # still base64url: large payloads are decoded only when decrypting
    tag: bytes


def protected_header(content_type: str, *, deflate: bool = False) -> str:
    header: dict[str, str] = {"alg": "dir", "enc": "A256GCM", "cty": content_type}
    if deflate:
        header["zip"] = "DEF"
    return b64url_encode(json.dumps(header, separators=(",", ":")).encode())


def encrypt(plaintext: bytes, key: bytes, content_type: str, *, deflate: bool = False) -> str:
    """Encrypt ``plaintext`` under ``key`` with a fresh random IV; return the compact JWE."""
    if len(key) != KEY_BYTES:
        raise ValueError("the key must be 32 bytes")
    if not plaintext:
        raise ValueError("nothing to encrypt: a compact JWE cannot carry an empty ciphertext")
    protected = protected_header(content_type, deflate=deflate)
    if deflate:
        packer = zlib.compressobj(9, zlib.DEFLATED, -15)
        plaintext = packer.compress(plaintext) + packer.flush()
    iv = os.urandom(IV_BYTES)
    sealed = AESGCM(key).encrypt(iv, plaintext, protected.encode("ascii"))
    ct, tag = sealed[:-TAG_BYTES], sealed[-TAG_BYTES:]
    return ".".join((protected, "", b64url_encode(iv), b64url_encode(ct), b64url_encode(tag)))


def parse(token: str, *, expected_cty: str | None = None) -> ParsedJwe:
    """Check the shape and header of a compact JWE without decrypting it.

    Raises ``BadRequest`` naming the first thing that is wrong.
    """
    if not isinstance(token, str):
        raise BadRequest("a JWE must be a string", code="invalid_jwe")
    parts = token.strip().split(".")
    if len(parts) != 5:
        raise BadRequest("a compact JWE has five dot-separated parts", code="invalid_jwe")
    protected, encrypted_key, iv_b64, ct_b64, tag_b64 = parts
    try:
        header = json.loads(b64url_decode(protected))
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the JWE header is not base64url JSON", code="invalid_jwe") from None
    if not isinstance(header, dict):
        raise BadRequest("the JWE header is not a JSON object", code="invalid_jwe")
    if header.get("alg") != "dir":
        raise BadRequest("the JWE header must say alg 'dir'", code="invalid_jwe")
    if header.get("enc") != "A256GCM":
        raise BadRequest("the JWE header must say enc 'A256GCM'", code="invalid_jwe")
    if "zip" in header and header["zip"] != "DEF":
        raise BadRequest("the only JWE zip supported is 'DEF'", code="invalid_jwe")
    if "crit" in header:
        raise BadRequest("JWE 'crit' headers are not supported", code="invalid_jwe")
    if expected_cty is not None and header.get("cty") != expected_cty:
        raise BadRequest(
            f"the JWE header cty must be {expected_cty!r} like the file's contentType",
            code="invalid_jwe",
        )
    if encrypted_key:
        raise BadRequest("with alg 'dir' the encrypted key part must be empty", code="invalid_jwe")
    try:
        iv = b64url_decode(iv_b64)
        tag = b64url_decode(tag_b64)
        if not ct_b64:
            raise ValueError
        # Validate the alphabet without materialising a second copy of a large payload.
        if len(ct_b64) % 4 == 1 or ct_b64.strip(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        ):
            raise ValueError
    except ValueError:
        raise BadRequest(
            "the JWE iv, ciphertext or tag is not base64url", code="invalid_jwe"
        ) from None
    if len(iv) != IV_BYTES:
        raise BadRequest("an A256GCM JWE needs a 96-bit iv", code="invalid_jwe")
    if len(tag) != TAG_BYTES:
        raise BadRequest("an A256GCM JWE needs a 128-bit tag", code="invalid_jwe")
    return ParsedJwe(header, protected, iv, ct_b64, tag)


def decrypt(
    token: str, key: bytes, *, max_inflated: int = 512 * 1024 * 1024
) -> tuple[dict[str, Any], bytes]:
    """Decrypt a compact JWE; return (header, plaintext). Inflates ``zip: DEF`` with a cap."""
    parsed = parse(token)
    if len(key) != KEY_BYTES:
        raise DecryptionError("the key must be 32 bytes")
    try:
        ct = b64url_decode(parsed.ciphertext)
        plaintext = AESGCM(key).decrypt(
            parsed.iv, ct + parsed.tag, parsed.protected.encode("ascii")
        )
    except (InvalidTag, ValueError):
        raise DecryptionError("the file does not decrypt with this key") from None
    if parsed.header.get("zip") == "DEF":
        plaintext = inflate(plaintext, max_inflated)
    return parsed.header, plaintext


def inflate(data: bytes, limit: int) -> bytes:
    """Raw DEFLATE decompression that refuses to grow past ``limit`` bytes (zip bombs)."""
    unpacker = zlib.decompressobj(-15)
    try:
        out = unpacker.decompress(data, limit + 1)
    except zlib.error:
        raise DecryptionError("the JWE says zip DEF but the content does not inflate") from None
    if len(out) > limit or unpacker.unconsumed_tail:
        raise DecryptionError("the inflated content is larger than allowed")
    if not unpacker.eof or unpacker.unused_data:
        raise DecryptionError(
            "the JWE says zip DEF but the DEFLATE stream is truncated or has trailing data"
        )
    return out
