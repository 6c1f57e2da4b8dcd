"""Compact JWE as SMART Health Links use it: ``alg: dir``, ``enc: A256GCM``, optional ``zip: DEF``.

    BASE64URL(header) . "" . BASE64URL(iv) . BASE64URL(ciphertext) . BASE64URL(tag)

The AAD is the ASCII of the encoded protected header (RFC 7516, 5.1 step 14).

Everything here streams: ``encrypt_stream`` reads the plaintext and writes the token a
chunk at a time (AES-GCM is a stream cipher and its tag comes last, which is exactly where
the compact serialisation puts it), ``decrypt_stream`` does the reverse from a seekable
source, and ``check_stream`` validates an uploaded token without decrypting it. Memory stays
at a few chunks whatever the size. ``encrypt``/``decrypt``/``parse`` are the same code over
in-memory buffers, for the small files most links carry.
"""

from __future__ import annotations

import io
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import pybase64
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from shlhost.crypto.b64 import b64url_decode, b64url_encode
from shlhost.errors import BadRequest, DecryptionError

KEY_BYTES = 32
IV_BYTES = 12
TAG_BYTES = 16

# Plaintext per step: whole base64 groups (a multiple of 3); large enough that the Python
# loop costs little, small enough to stay in the CPU's caches and in the allocator's heap.
CHUNK = 3 * 64 * 1024
B64_CHUNK = CHUNK // 3 * 4  # the same step in base64url characters (a multiple of 4)
HEADER_MAX = 16 * 1024  # the protected header, the empty key part and the iv come first
TAIL_MAX = 128  # the tag (22 characters) and any trailing whitespace come last

NOT_BASE64URL = "the JWE iv, ciphertext or tag is not base64url"
FIVE_PARTS = "a compact JWE has five dot-separated parts"


@dataclass(frozen=True)
class ParsedJwe:
    """A checked token; the ciphertext stays in the source (bytes ``ct_start``..``ct_end``)."""

    header: dict[str, Any]
    protected: str
    iv: bytes
    tag: bytes
    ct_start: int
    ct_end: int
    start: int  # the whole token, without surrounding whitespace
    end: int

    @property
    def ct_length(self) -> int:
        return self.ct_end - self.ct_start


def _invalid(message: str) -> BadRequest:
    return BadRequest(message, code="invalid_jwe")


def protected_header(content_type: str, *, deflate: bool = False) -> str:
    header: dict[str, str] = {"alg": "dir", "enc": "A256GCM", "cty": content_type}
    if deflate:
        header["zip"] = "DEF"
    return b64url_encode(json.dumps(header, separators=(",", ":")).encode())


# -- encryption ---------------------------------------------------------------------------


class _Base64UrlWriter:
    """Writes base64url of what it is given, carrying the 0-2 bytes that do not yet make a
    whole group to the next call; ``close`` writes the unpadded end."""

    def __init__(self, dst: IO[bytes]) -> None:
        self.dst = dst
        self.carry = b""
        self.written = 0

    def write(self, data: bytes | memoryview) -> None:
        if self.carry:
            data = self.carry + bytes(data)
        whole = len(data) - len(data) % 3
        if whole:
            self.written += self.dst.write(pybase64.urlsafe_b64encode(data[:whole]))
        self.carry = bytes(data[whole:])

    def close(self) -> None:
        if self.carry:
            self.written += self.dst.write(b64url_encode(self.carry).encode("ascii"))
            self.carry = b""


def encrypt_stream(
    src: IO[bytes], dst: IO[bytes], key: bytes, content_type: str, *, deflate: bool = False
) -> int:
    """Encrypt what ``src`` holds (from its position to its end) under ``key`` with a fresh
    random IV, writing the compact JWE to ``dst``; return the number of bytes written.

    Raises ``ValueError`` before writing anything if the key is wrong or ``src`` is empty.
    """
    if len(key) != KEY_BYTES:
        raise ValueError("the key must be 32 bytes")
    first = src.read(CHUNK)
    if not first:
        raise ValueError("nothing to encrypt: a compact JWE cannot carry an empty ciphertext")
    protected = protected_header(content_type, deflate=deflate)
    iv = os.urandom(IV_BYTES)
    encryptor = Cipher(algorithms.AES(key), modes.GCM(iv)).encryptor()
    encryptor.authenticate_additional_data(protected.encode("ascii"))
    written = dst.write(f"{protected}..{b64url_encode(iv)}.".encode("ascii"))
    body = _Base64UrlWriter(dst)
    sealed = bytearray(CHUNK + 15)  # update_into wants room for one block more than the input
    packer = zlib.compressobj(9, zlib.DEFLATED, -15) if deflate else None

    def seal(data: bytes) -> None:
        view = memoryview(data)
        for offset in range(0, len(view), CHUNK):
            n = encryptor.update_into(view[offset : offset + CHUNK], sealed)
            body.write(memoryview(sealed)[:n])

    chunk = first
    while chunk:
        seal(packer.compress(chunk) if packer else chunk)
        chunk = src.read(CHUNK)
    if packer:
        seal(packer.flush())
    encryptor.finalize()
    body.close()
    written += body.written
    written += dst.write(b"." + b64url_encode(encryptor.tag).encode("ascii"))
    return written


def encrypt(plaintext: bytes, key: bytes, content_type: str, *, deflate: bool = False) -> str:
    """Encrypt ``plaintext`` under ``key`` with a fresh random IV; return the compact JWE."""
    out = io.BytesIO()
    encrypt_stream(io.BytesIO(plaintext), out, key, content_type, deflate=deflate)
    return out.getvalue().decode("ascii")


# -- parsing ------------------------------------------------------------------------------


def _decode_ciphertext(chunk: bytes, *, last: bool) -> bytes:
    """Strict unpadded base64url of one step of ciphertext (a multiple of 4 unless ``last``)."""
    if b"." in chunk:
        raise _invalid(FIVE_PARTS)
    if b"+" in chunk or b"/" in chunk or b"=" in chunk or (last and len(chunk) % 4 == 1):
        raise _invalid(NOT_BASE64URL)
    if last:
        chunk += b"=" * (-len(chunk) % 4)
    try:
        decoded: bytes = pybase64.b64decode(chunk, altchars=b"-_", validate=True)
    except ValueError:  # binascii.Error is a ValueError
        raise _invalid(NOT_BASE64URL) from None
    return decoded


def _span(src: IO[bytes], start: int, end: int) -> Iterator[tuple[bytes, bool]]:
    """Bytes ``start``..``end`` of ``src`` in steps of ``B64_CHUNK``, each with "is it the last"."""
    src.seek(start)
    left = end - start
    while left > 0:
        chunk = src.read(min(B64_CHUNK, left))
        if not chunk:
            raise _invalid("the JWE ends early")
        left -= len(chunk)
        yield chunk, left <= 0


def _ciphertext(src: IO[bytes], parsed: ParsedJwe) -> Iterator[bytes]:
    """The raw ciphertext, one decoded step at a time."""
    for chunk, last in _span(src, parsed.ct_start, parsed.ct_end):
        yield _decode_ciphertext(chunk, last=last)


def _scan(src: IO[bytes], *, expected_cty: str | None, check_ciphertext: bool) -> ParsedJwe:
    """Check the shape and header of the compact JWE that is the whole of seekable ``src``
    (surrounding whitespace allowed). Reads the header and the tag; reads the ciphertext
    only if ``check_ciphertext``. Raises ``BadRequest`` naming the first fault."""
    start = src.seek(0)
    head = src.read(HEADER_MAX)
    lead = len(head) - len(head.lstrip())
    head = head[lead:]
    tail_start = max(start, src.seek(0, os.SEEK_END) - TAIL_MAX)
    src.seek(tail_start)
    tail = src.read().rstrip()
    end = tail_start + len(tail)  # the token's end, without trailing whitespace
    parts = head.split(b".", 3)
    if len(parts) < 4:
        raise _invalid(FIVE_PARTS)
    protected_b, encrypted_key, iv_b = parts[0], parts[1], parts[2]
    ct_start = start + lead + len(protected_b) + len(encrypted_key) + len(iv_b) + 3
    last_dot = tail.rfind(b".")
    ct_end = tail_start + last_dot if last_dot >= 0 else -1
    if ct_end < ct_start:
        raise _invalid(FIVE_PARTS)
    tag_b = tail[last_dot + 1 :]
    try:
        protected = protected_b.decode("ascii")
        header = json.loads(b64url_decode(protected))
    except (ValueError, UnicodeDecodeError):
        raise _invalid("the JWE header is not base64url JSON") from None
    if not isinstance(header, dict):
        raise _invalid("the JWE header is not a JSON object")
    if header.get("alg") != "dir":
        raise _invalid("the JWE header must say alg 'dir'")
    if header.get("enc") != "A256GCM":
        raise _invalid("the JWE header must say enc 'A256GCM'")
    if "zip" in header and header["zip"] != "DEF":
        raise _invalid("the only JWE zip supported is 'DEF'")
    if "crit" in header:
        raise _invalid("JWE 'crit' headers are not supported")
    if expected_cty is not None and header.get("cty") != expected_cty:
        raise _invalid(f"the JWE header cty must be {expected_cty!r} like the file's contentType")
    if encrypted_key:
        raise _invalid("with alg 'dir' the encrypted key part must be empty")
    try:
        iv = b64url_decode(iv_b.decode("ascii"))
        tag = b64url_decode(tag_b.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        raise _invalid(NOT_BASE64URL) from None
    parsed = ParsedJwe(header, protected, iv, tag, ct_start, ct_end, start + lead, end)
    if parsed.ct_length == 0 or parsed.ct_length % 4 == 1:
        raise _invalid(NOT_BASE64URL)
    if check_ciphertext:
        for _step in _ciphertext(src, parsed):
            pass
    if len(iv) != IV_BYTES:
        raise _invalid("an A256GCM JWE needs a 96-bit iv")
    if len(tag) != TAG_BYTES:
        raise _invalid("an A256GCM JWE needs a 128-bit tag")
    return parsed


def check_stream(src: IO[bytes], *, expected_cty: str | None = None) -> ParsedJwe:
    """Validate the whole compact JWE in seekable ``src`` without its key (an upload)."""
    return _scan(src, expected_cty=expected_cty, check_ciphertext=True)


def copy_token(src: IO[bytes], parsed: ParsedJwe, dst: IO[bytes]) -> int:
    """Copy the token ``parsed`` found in ``src`` (without surrounding whitespace) to ``dst``."""
    for chunk, _last in _span(src, parsed.start, parsed.end):
        dst.write(chunk)
    return parsed.end - parsed.start


def parse(token: str, *, expected_cty: str | None = None) -> ParsedJwe:
    """Check the shape and header of a compact JWE without decrypting it.

    Raises ``BadRequest`` naming the first thing that is wrong.
    """
    if not isinstance(token, str):
        raise _invalid("a JWE must be a string")
    if token.count(".") != 4:
        raise _invalid(FIVE_PARTS)
    try:
        raw = token.encode("ascii")
    except UnicodeEncodeError:
        raise _invalid(NOT_BASE64URL) from None
    return _scan(io.BytesIO(raw), expected_cty=expected_cty, check_ciphertext=True)


# -- decryption ---------------------------------------------------------------------------


class Inflater:
    """Raw DEFLATE decompression, a piece at a time, that refuses to grow past ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self.unpacker = zlib.decompressobj(-15)

    def feed(self, data: bytes) -> bytes:
        try:
            out = self.unpacker.decompress(data, self.limit - self.total + 1)
        except zlib.error:
            raise DecryptionError("the JWE says zip DEF but the content does not inflate") from None
        self.total += len(out)
        if self.total > self.limit or self.unpacker.unconsumed_tail:
            raise DecryptionError("the inflated content is larger than allowed")
        return out

    def finish(self) -> None:
        if not self.unpacker.eof or self.unpacker.unused_data:
            raise DecryptionError(
                "the JWE says zip DEF but the DEFLATE stream is truncated or has trailing data"
            )


def inflate(data: bytes, limit: int) -> bytes:
    """Raw DEFLATE decompression that refuses to grow past ``limit`` bytes (zip bombs)."""
    inflater = Inflater(limit)
    out = inflater.feed(data)
    inflater.finish()
    return out


def decrypt_stream(
    src: IO[bytes], dst: IO[bytes], key: bytes, *, max_inflated: int = 512 * 1024 * 1024
) -> dict[str, Any]:
    """Decrypt the compact JWE in seekable ``src`` into ``dst``; return its header.

    The plaintext is written before the tag at the end can be checked: on any exception
    what ``dst`` holds is not authentic and must be thrown away. ``zip: DEF`` is inflated
    with a cap; a content that does not inflate is reported only once the tag has proved
    the key right, so a wrong key always reads as a wrong key.
    """
    parsed = _scan(src, expected_cty=None, check_ciphertext=False)
    if len(key) != KEY_BYTES:
        raise DecryptionError("the key must be 32 bytes")
    decryptor = Cipher(algorithms.AES(key), modes.GCM(parsed.iv)).decryptor()
    decryptor.authenticate_additional_data(parsed.protected.encode("ascii"))
    inflater = Inflater(max_inflated) if parsed.header.get("zip") == "DEF" else None
    plain = bytearray(B64_CHUNK + 15)
    deferred: DecryptionError | None = None
    for step in _ciphertext(src, parsed):
        n = decryptor.update_into(step, plain)
        if inflater is None:
            dst.write(memoryview(plain)[:n])
        elif deferred is None:
            try:
                dst.write(inflater.feed(bytes(plain[:n])))
            except DecryptionError as exc:
                deferred = exc
    try:
        decryptor.finalize_with_tag(parsed.tag)
    except InvalidTag:
        raise DecryptionError("the file does not decrypt with this key") from None
    if deferred is not None:
        raise deferred
    if inflater is not None:
        inflater.finish()
    return parsed.header


def decrypt(
    token: str, key: bytes, *, max_inflated: int = 512 * 1024 * 1024
) -> tuple[dict[str, Any], bytes]:
    """Decrypt a compact JWE; return (header, plaintext). Inflates ``zip: DEF`` with a cap."""
    parse(token)  # the token's own faults first, with their messages
    out = io.BytesIO()
    header = decrypt_stream(io.BytesIO(token.encode("ascii")), out, key, max_inflated=max_inflated)
    return header, out.getvalue()
