"""Link keys, their wrapping under the instance key-encryption key, and opaque tokens."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shlhost.crypto.b64 import b64url_encode

WRAP_VERSION = b"\x01"


def new_link_key() -> bytes:
    return os.urandom(32)


def wrap_key(kek: bytes, key: bytes, context: str) -> bytes:
    """AES-256-GCM under the KEK; ``context`` (the link id) is bound in as AAD.

    A wrapped key copied onto another link's row does not unwrap.
    """
    nonce = os.urandom(12)
    return WRAP_VERSION + nonce + AESGCM(kek).encrypt(nonce, key, context.encode())


def unwrap_key(kek: bytes, wrapped: bytes, context: str) -> bytes:
    if wrapped[:1] != WRAP_VERSION:
        raise ValueError("unknown key wrapping version")
    nonce, sealed = wrapped[1:13], wrapped[13:]
    try:
        return AESGCM(kek).decrypt(nonce, sealed, context.encode())
    except InvalidTag:
        raise ValueError("the wrapped key does not open with this key-encryption key") from None


def new_token(nbytes: int = 32) -> str:
    """A random opaque token, base64url (32 bytes: 43 characters, 256 bits)."""
    return b64url_encode(secrets.token_bytes(nbytes))


def token_hash(token: str) -> str:
    """Tokens are high-entropy, so a plain SHA-256 is enough to store them (no salt needed)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def token_matches(token: str, stored_hash: str | None) -> bool:
    if not stored_hash:
        return False
    return hmac.compare_digest(token_hash(token), stored_hash)
