"""Link-key wrapping under the KEK (bound to the link id), and opaque tokens."""

from __future__ import annotations

import hashlib
import os
import re

import pytest

from shlhost.crypto import keys

KEK = os.urandom(32)


def test_new_link_key_is_32_random_bytes() -> None:
    a, b = keys.new_link_key(), keys.new_link_key()
    assert len(a) == 32 and len(b) == 32
    assert a != b


def test_wrap_unwrap_round_trip() -> None:
    key = keys.new_link_key()
    wrapped = keys.wrap_key(KEK, key, "link-1")
    assert key not in wrapped
    assert wrapped[:1] == keys.WRAP_VERSION
    assert len(wrapped) == 1 + 12 + 32 + 16
    assert keys.unwrap_key(KEK, wrapped, "link-1") == key


def test_wrapping_uses_a_fresh_nonce() -> None:
    key = keys.new_link_key()
    wrapped = {keys.wrap_key(KEK, key, "link-1") for _ in range(20)}
    assert len(wrapped) == 20
    for w in wrapped:
        assert keys.unwrap_key(KEK, w, "link-1") == key


def test_unwrap_with_another_link_id_fails() -> None:
    wrapped = keys.wrap_key(KEK, keys.new_link_key(), "link-1")
    for other in ("link-2", "link-1 ", "", "LINK-1"):
        with pytest.raises(ValueError):
            keys.unwrap_key(KEK, wrapped, other)


def test_unwrap_with_another_kek_fails() -> None:
    wrapped = keys.wrap_key(KEK, keys.new_link_key(), "link-1")
    with pytest.raises(ValueError):
        keys.unwrap_key(os.urandom(32), wrapped, "link-1")


def test_unwrap_tampered_or_unknown_version_fails() -> None:
    wrapped = bytearray(keys.wrap_key(KEK, keys.new_link_key(), "link-1"))
    tampered = bytes(wrapped[:-1]) + bytes([wrapped[-1] ^ 1])
    with pytest.raises(ValueError):
        keys.unwrap_key(KEK, tampered, "link-1")
    with pytest.raises(ValueError, match="version"):
        keys.unwrap_key(KEK, b"\x02" + bytes(wrapped[1:]), "link-1")
    with pytest.raises(ValueError):
        keys.unwrap_key(KEK, b"", "link-1")


def test_new_token() -> None:
    tokens = {keys.new_token() for _ in range(100)}
    assert len(tokens) == 100
    for token in tokens:
        assert len(token) == 43
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", token)
    assert len(keys.new_token(16)) == 22


def test_token_hash() -> None:
    token = keys.new_token()
    assert keys.token_hash(token) == hashlib.sha256(token.encode()).hexdigest()
    assert keys.token_hash(token) != keys.token_hash(keys.new_token())
    assert re.fullmatch(r"[0-9a-f]{64}", keys.token_hash(token))


def test_token_matches() -> None:
    token = keys.new_token()
    stored = keys.token_hash(token)
    assert keys.token_matches(token, stored)
    assert not keys.token_matches(keys.new_token(), stored)
    assert not keys.token_matches(token[:-1], stored)
    assert not keys.token_matches(token, stored.upper())
    assert not keys.token_matches(token, None)
    assert not keys.token_matches(token, "")
    assert not keys.token_matches("", "")
    assert not keys.token_matches(token, token)  # the token itself is not its hash
