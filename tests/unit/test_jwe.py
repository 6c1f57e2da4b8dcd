"""Compact JWE (dir + A256GCM): the spec's test vector, shlhost's output, and what it rejects.

Every positive result is cross-checked with ``tests.helpers.independent_decrypt`` and with
jwcrypto, so a bug in ``shlhost.crypto.jwe`` cannot hide behind itself.
"""

from __future__ import annotations

import base64
import json
import os
import random
import zlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jwcrypto import jwe as jwc_jwe
from jwcrypto import jwk as jwc_jwk

from shlhost.crypto import jwe
from shlhost.errors import BadRequest, DecryptionError
from tests.conftest import SHARED, require
from tests.helpers import independent_decrypt, jwcrypto_decrypt

SPEC_KEY = "rxTgYlOaKJPFtcEd0qcceN8wEU4p94SqAwIWQe6uX7Q"
SPEC_JWE = SHARED / "fixtures" / "shl-spec-example.jwe"
CONTENT_TYPES = ("application/smart-health-card", "application/fhir+json", "application/smart-api-access")


# --- independent helpers (no shlhost code) -----------------------------------------------


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    return packer.compress(data) + packer.flush()


def seal(header: dict[str, Any] | str, plaintext: bytes, key: bytes, *, encrypted_key: str = "",
         iv: bytes | None = None, tag_len: int = 16) -> str:
    """An honestly encrypted compact JWE with any header, so only the part under test is wrong."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    text = header if isinstance(header, str) else json.dumps(header, separators=(",", ":"))
    protected = b64e(text.encode())
    iv = os.urandom(12) if iv is None else iv
    sealed = AESGCM(key).encrypt(iv, plaintext, protected.encode("ascii"))
    ct, tag = sealed[:-16], sealed[-16:]
    return ".".join((protected, encrypted_key, b64e(iv), b64e(ct), b64e(tag[:tag_len])))


GOOD_HEADER = {"alg": "dir", "enc": "A256GCM", "cty": "application/fhir+json"}


@pytest.fixture
def key() -> bytes:
    return os.urandom(32)


def spec_token() -> str:
    require(SPEC_JWE.is_file(), f"the spec's test vector is not at {SPEC_JWE} (../shared is absent)")
    return SPEC_JWE.read_text().strip()


def assert_invalid(token: str, key: bytes, reason: str, **parse_kwargs: Any) -> None:
    """parse and decrypt both refuse the token as invalid_jwe, for the expected reason."""
    with pytest.raises(BadRequest, match=reason) as parsed:
        jwe.parse(token, **parse_kwargs)
    assert parsed.value.code == "invalid_jwe"
    assert not isinstance(parsed.value, DecryptionError)
    if not parse_kwargs:
        with pytest.raises(BadRequest, match=reason) as decrypted:
            jwe.decrypt(token, key)
        assert decrypted.value.code == "invalid_jwe"


# --- the spec's test vector --------------------------------------------------------------


def test_spec_vector_decrypts_with_shlhost() -> None:
    header, plaintext = jwe.decrypt(spec_token(), b64d(SPEC_KEY))
    assert header["alg"] == "dir"
    assert header["enc"] == "A256GCM"
    assert header["cty"] == "application/smart-health-card"
    assert len(plaintext) == 846
    assert isinstance(json.loads(plaintext)["verifiableCredential"], list)


def test_spec_vector_decrypts_identically_with_independent_code_and_jwcrypto() -> None:
    token = spec_token()
    _, ours = jwe.decrypt(token, b64d(SPEC_KEY))
    header, theirs = independent_decrypt(token, SPEC_KEY)
    assert header["cty"] == "application/smart-health-card"
    assert theirs == ours
    assert jwcrypto_decrypt(token, SPEC_KEY) == ours
    assert len(ours) == 846
    assert "verifiableCredential" in json.loads(ours)


def test_spec_vector_parses_with_expected_cty() -> None:
    parsed = jwe.parse(spec_token(), expected_cty="application/smart-health-card")
    assert len(parsed.iv) == 12
    assert len(parsed.tag) == 16


def test_spec_vector_with_another_key_fails() -> None:
    with pytest.raises(DecryptionError):
        jwe.decrypt(spec_token(), os.urandom(32))


# --- what shlhost emits ------------------------------------------------------------------


@pytest.mark.parametrize("cty", CONTENT_TYPES)
def test_encrypt_output_shape(key: bytes, cty: str) -> None:
    token = jwe.encrypt(b'{"resourceType":"Bundle"}', key, cty)
    parts = token.split(".")
    assert len(parts) == 5
    protected, encrypted_key, iv, ct, tag = parts
    header_text = b64d(protected).decode("ascii")
    assert json.loads(header_text) == {"alg": "dir", "enc": "A256GCM", "cty": cty}
    assert list(json.loads(header_text)) == ["alg", "enc", "cty"]
    assert header_text == json.dumps({"alg": "dir", "enc": "A256GCM", "cty": cty}, separators=(",", ":"))
    assert encrypted_key == ""
    assert len(b64d(iv)) == 12
    assert len(b64d(tag)) == 16
    assert len(b64d(ct)) == len(b'{"resourceType":"Bundle"}')  # GCM: no padding, no zip
    for part in parts:
        assert "=" not in part and "+" not in part and "/" not in part


def test_encrypt_output_decrypts_with_independent_code_and_jwcrypto(key: bytes) -> None:
    plaintext = json.dumps({"resourceType": "Bundle", "entry": [{"x": "é" * 50}]}).encode()
    token = jwe.encrypt(plaintext, key, "application/fhir+json")
    header, out = independent_decrypt(token, b64e(key))
    assert out == plaintext
    assert header == {"alg": "dir", "enc": "A256GCM", "cty": "application/fhir+json"}
    assert jwcrypto_decrypt(token, b64e(key)) == plaintext
    assert jwe.decrypt(token, key) == (header, plaintext)


def test_jwcrypto_sees_the_cty_header(key: bytes) -> None:
    token = jwe.encrypt(b"{}", key, "application/smart-api-access")
    obj = jwc_jwe.JWE()
    obj.deserialize(token, key=jwc_jwk.JWK(kty="oct", k=b64e(key)))
    assert obj.jose_header["cty"] == "application/smart-api-access"
    assert obj.payload == b"{}"


def test_fresh_iv_every_call(key: bytes) -> None:
    tokens = [jwe.encrypt(b"same plaintext", key, "application/fhir+json") for _ in range(64)]
    ivs = {t.split(".")[2] for t in tokens}
    cts = {t.split(".")[3] for t in tokens}
    assert len(ivs) == 64
    assert len(cts) == 64
    for t in tokens:
        assert jwe.decrypt(t, key)[1] == b"same plaintext"


def test_deflate_adds_zip_def_and_round_trips(key: bytes) -> None:
    plaintext = json.dumps({"resourceType": "Bundle", "entry": [{"n": i} for i in range(500)]}).encode()
    token = jwe.encrypt(plaintext, key, "application/fhir+json", deflate=True)
    header = json.loads(b64d(token.split(".")[0]))
    assert header == {"alg": "dir", "enc": "A256GCM", "cty": "application/fhir+json", "zip": "DEF"}
    # It really is compressed: the ciphertext is much shorter than the plaintext.
    assert len(b64d(token.split(".")[3])) < len(plaintext) // 4
    assert jwe.decrypt(token, key) == (header, plaintext)
    assert independent_decrypt(token, b64e(key))[1] == plaintext
    assert jwcrypto_decrypt(token, b64e(key)) == plaintext


def test_decrypt_accepts_zip_def_made_by_someone_else(key: bytes) -> None:
    plaintext = b'{"a": "' + b"z" * 5000 + b'"}'
    header = {**GOOD_HEADER, "zip": "DEF"}
    token = seal(header, raw_deflate(plaintext), key)
    assert jwe.decrypt(token, key) == (header, plaintext)


def test_no_deflate_by_default(key: bytes) -> None:
    token = jwe.encrypt(b"a" * 1000, key, "application/fhir+json")
    assert "zip" not in json.loads(b64d(token.split(".")[0]))
    assert len(b64d(token.split(".")[3])) == 1000


def test_encrypt_refuses_a_key_that_is_not_32_bytes() -> None:
    with pytest.raises(ValueError):
        jwe.encrypt(b"x", os.urandom(16), "application/fhir+json")


def test_decrypt_refuses_a_key_that_is_not_32_bytes(key: bytes) -> None:
    token = jwe.encrypt(b"x", key, "application/fhir+json")
    with pytest.raises(DecryptionError):
        jwe.decrypt(token, key[:16])


def test_encrypt_never_emits_a_token_its_own_decrypt_rejects(key: bytes) -> None:
    try:
        token = jwe.encrypt(b"", key, "application/fhir+json")
    except ValueError:
        return  # refusing empty content would be consistent too
    assert jwe.decrypt(token, key)[1] == b""


# --- property: round trip over arbitrary bytes and content types ---------------------------


def _sized_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)  # noqa: S311 - test data, not secrets


payloads = st.one_of(
    st.binary(min_size=1, max_size=300),
    st.builds(_sized_bytes, st.integers(1, 64 * 1024), st.integers(0, 2**32)),
    st.builds(lambda n, b: bytes([b]) * n, st.integers(1, 64 * 1024), st.integers(0, 255)),
)
content_types = st.one_of(st.sampled_from(CONTENT_TYPES), st.text(max_size=40))


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(plaintext=payloads, cty=content_types, deflate=st.booleans(), raw_key=st.binary(min_size=32, max_size=32))
def test_round_trip_property(plaintext: bytes, cty: str, deflate: bool, raw_key: bytes) -> None:
    token = jwe.encrypt(plaintext, raw_key, cty, deflate=deflate)
    expected_header: dict[str, str] = {"alg": "dir", "enc": "A256GCM", "cty": cty}
    if deflate:
        expected_header["zip"] = "DEF"

    parsed = jwe.parse(token, expected_cty=cty)
    assert parsed.header == expected_header
    header, out = jwe.decrypt(token, raw_key)
    assert header == expected_header
    assert out == plaintext

    ind_header, ind_out = independent_decrypt(token, b64e(raw_key))
    assert ind_header == expected_header
    assert ind_out == plaintext
    assert jwcrypto_decrypt(token, b64e(raw_key)) == plaintext


# --- rejections --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "encrypted_key", "reason"),
    [
        ({"alg": "none", "enc": "A256GCM"}, "", "alg"),
        ({"enc": "A256GCM"}, "", "alg"),
        ({"alg": "RSA-OAEP", "enc": "A256GCM"}, b64e(os.urandom(256)), "alg"),
        ({"alg": "A128KW", "enc": "A256GCM"}, b64e(os.urandom(40)), "alg"),
        ({"alg": "A256KW", "enc": "A256GCM"}, b64e(os.urandom(40)), "alg"),
        ({"alg": "dir", "enc": "A128GCM"}, "", "enc"),
        ({"alg": "dir", "enc": "A256CBC-HS512"}, "", "enc"),
        ({"alg": "dir"}, "", "enc"),
        ({"alg": "dir", "enc": "A256GCM", "zip": "GZIP"}, "", "zip"),
        ({"alg": "dir", "enc": "A256GCM", "crit": ["exp"], "exp": 1}, "", "crit"),
    ],
)
def test_rejects_unsupported_headers(key: bytes, header: dict[str, Any], encrypted_key: str, reason: str) -> None:
    assert_invalid(seal(header, b"{}", key, encrypted_key=encrypted_key), key, reason)


def test_rejects_non_empty_encrypted_key_with_alg_dir(key: bytes) -> None:
    token = seal(GOOD_HEADER, b"{}", key, encrypted_key=b64e(os.urandom(32)))
    assert_invalid(token, key, "encrypted key")


def test_rejects_truncated_tag(key: bytes) -> None:
    assert_invalid(seal(GOOD_HEADER, b"{}", key, tag_len=12), key, "tag")
    token = jwe.encrypt(b"{}", key, "application/fhir+json")
    head, ek, iv, ct, tag = token.split(".")
    assert_invalid(".".join((head, ek, iv, ct, b64e(b64d(tag)[:15]))), key, "tag")


def test_rejects_8_byte_iv(key: bytes) -> None:
    # AES-GCM itself accepts an 8-byte nonce, so only shlhost's own check can refuse it.
    assert_invalid(seal(GOOD_HEADER, b"{}", key, iv=os.urandom(8)), key, "iv")


def test_rejects_16_byte_iv(key: bytes) -> None:
    assert_invalid(seal(GOOD_HEADER, b"{}", key, iv=os.urandom(16)), key, "iv")


@pytest.mark.parametrize("count", [1, 3, 4, 6])
def test_rejects_wrong_number_of_parts(key: bytes, count: int) -> None:
    token = jwe.encrypt(b"{}", key, "application/fhir+json")
    parts = token.split(".")
    mangled = ".".join((parts + parts)[:count])
    assert_invalid(mangled, key, "five")


def test_rejects_four_parts_without_encrypted_key(key: bytes) -> None:
    head, _ek, iv, ct, tag = jwe.encrypt(b"{}", key, "application/fhir+json").split(".")
    assert_invalid(".".join((head, iv, ct, tag)), key, "five")


@pytest.mark.parametrize("part", [2, 3, 4])
@pytest.mark.parametrize("garbage", ["!!!!", "ab+/", "abc=", "a", "ab cd", "é"])
def test_rejects_garbage_base64(key: bytes, part: int, garbage: str) -> None:
    parts = jwe.encrypt(b"{}", key, "application/fhir+json").split(".")
    parts[part] = garbage
    assert_invalid(".".join(parts), key, "base64url")


def test_rejects_empty_ciphertext_part(key: bytes) -> None:
    parts = jwe.encrypt(b"{}", key, "application/fhir+json").split(".")
    parts[3] = ""
    assert_invalid(".".join(parts), key, "base64url")


@pytest.mark.parametrize("header", ["not json", "", "{'alg': 'dir'}", '{"alg":"dir"'])
def test_rejects_non_json_header(key: bytes, header: str) -> None:
    assert_invalid(seal(header, b"{}", key), key, "header")


@pytest.mark.parametrize("header", ['["dir"]', '"dir"', "null", "42"])
def test_rejects_header_that_is_not_an_object(key: bytes, header: str) -> None:
    assert_invalid(seal(header, b"{}", key), key, "header")


def test_rejects_header_that_is_not_base64url(key: bytes) -> None:
    parts = jwe.encrypt(b"{}", key, "application/fhir+json").split(".")
    parts[0] = "eyJ+" + parts[0]
    assert_invalid(".".join(parts), key, "header")


def test_rejects_header_that_is_not_utf8(key: bytes) -> None:
    parts = jwe.encrypt(b"{}", key, "application/fhir+json").split(".")
    parts[0] = b64e(b"{\"alg\":\"\xc3\x28\"}")
    assert_invalid(".".join(parts), key, "header")


def test_rejects_non_string_token(key: bytes) -> None:
    with pytest.raises(BadRequest) as exc:
        jwe.parse(b"a.b.c.d.e")  # type: ignore[arg-type]
    assert exc.value.code == "invalid_jwe"


def test_wrong_key_is_a_decryption_error(key: bytes) -> None:
    token = jwe.encrypt(b'{"resourceType":"Bundle"}', key, "application/fhir+json")
    jwe.parse(token)  # well formed
    with pytest.raises(DecryptionError) as exc:
        jwe.decrypt(token, os.urandom(32))
    assert exc.value.code == "decryption_failed"


@pytest.mark.parametrize("bit", [0, 7, 8 * 10 + 3, -1])
def test_flipped_ciphertext_bit_is_a_decryption_error(key: bytes, bit: int) -> None:
    head, ek, iv, ct, tag = jwe.encrypt(b"x" * 40, key, "application/fhir+json").split(".")
    raw = bytearray(b64d(ct))
    index = bit if bit >= 0 else len(raw) * 8 - 1
    raw[index // 8] ^= 1 << (index % 8)
    with pytest.raises(DecryptionError):
        jwe.decrypt(".".join((head, ek, iv, b64e(bytes(raw)), tag)), key)


def test_flipped_tag_or_iv_bit_is_a_decryption_error(key: bytes) -> None:
    head, ek, iv, ct, tag = jwe.encrypt(b"x" * 40, key, "application/fhir+json").split(".")
    bad_tag = bytearray(b64d(tag))
    bad_tag[0] ^= 1
    with pytest.raises(DecryptionError):
        jwe.decrypt(".".join((head, ek, iv, ct, b64e(bytes(bad_tag)))), key)
    bad_iv = bytearray(b64d(iv))
    bad_iv[11] ^= 0x80
    with pytest.raises(DecryptionError):
        jwe.decrypt(".".join((head, ek, b64e(bytes(bad_iv)), ct, tag)), key)


def test_header_is_authenticated_as_aad(key: bytes) -> None:
    """Swapping in another valid header (another cty) must break the tag."""
    _, ek, iv, ct, tag = jwe.encrypt(b"{}", key, "application/fhir+json").split(".")
    other = jwe.encrypt(b"{}", key, "application/smart-health-card").split(".")[0]
    swapped = ".".join((other, ek, iv, ct, tag))
    jwe.parse(swapped)  # well formed
    with pytest.raises(DecryptionError):
        jwe.decrypt(swapped, key)


def test_same_header_json_with_other_encoding_is_not_accepted(key: bytes) -> None:
    """The AAD is the header's base64url text, not the parsed JSON."""
    _, ek, iv, ct, tag = jwe.encrypt(b"{}", key, "application/fhir+json").split(".")
    spaced = b64e(json.dumps({"alg": "dir", "enc": "A256GCM", "cty": "application/fhir+json"}).encode())
    with pytest.raises(DecryptionError):
        jwe.decrypt(".".join((spaced, ek, iv, ct, tag)), key)


def test_cty_mismatch_with_expected_cty(key: bytes) -> None:
    token = jwe.encrypt(b"{}", key, "application/smart-health-card")
    assert jwe.parse(token, expected_cty="application/smart-health-card").header["cty"] == (
        "application/smart-health-card"
    )
    assert_invalid(token, key, "cty", expected_cty="application/fhir+json")
    no_cty = seal({"alg": "dir", "enc": "A256GCM"}, b"{}", key)
    assert jwe.parse(no_cty).header == {"alg": "dir", "enc": "A256GCM"}
    assert_invalid(no_cty, key, "cty", expected_cty="application/fhir+json")


# --- inflate limits (zip bombs) ------------------------------------------------------------


def test_inflate_refuses_to_grow_past_the_limit() -> None:
    bomb = raw_deflate(b"\0" * (8 * 1024 * 1024))
    assert len(bomb) < 16 * 1024
    with pytest.raises(DecryptionError, match="larger"):
        jwe.inflate(bomb, 1024 * 1024)


def test_inflate_limit_is_exact() -> None:
    data = raw_deflate(b"a" * 1000)
    assert jwe.inflate(data, 1000) == b"a" * 1000
    with pytest.raises(DecryptionError):
        jwe.inflate(data, 999)


def test_inflate_refuses_data_that_is_not_deflate() -> None:
    with pytest.raises(DecryptionError, match="inflate"):
        jwe.inflate(b"\xff\xff\xff\xff not deflate", 1024)


def test_inflate_refuses_truncated_stream() -> None:
    data = raw_deflate(b"hello world " * 200)
    with pytest.raises(DecryptionError):
        jwe.inflate(data[:-3], 1024 * 1024)


def test_decrypt_applies_max_inflated_to_zip_def(key: bytes) -> None:
    plaintext = b"\0" * (2 * 1024 * 1024)
    token = jwe.encrypt(plaintext, key, "application/fhir+json", deflate=True)
    assert len(token) < 20 * 1024
    with pytest.raises(DecryptionError):
        jwe.decrypt(token, key, max_inflated=64 * 1024)
    assert jwe.decrypt(token, key, max_inflated=len(plaintext))[1] == plaintext


def test_zip_def_over_non_deflate_content_is_a_decryption_error(key: bytes) -> None:
    token = seal({**GOOD_HEADER, "zip": "DEF"}, b"\xff\xff\xff\xff plain", key)
    with pytest.raises(DecryptionError):
        jwe.decrypt(token, key)
