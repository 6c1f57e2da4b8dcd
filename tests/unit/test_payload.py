"""The SHL payload: ``shlink:/`` + base64url(minified JSON), bare or behind a viewer URL."""

from __future__ import annotations

import base64
import json
import os
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shlhost.errors import BadRequest
from shlhost.shl import payload as shl
from shlhost.shl.payload import Payload, decode, encode, normalise_flags

KEY = base64.urlsafe_b64encode(bytes(range(32))).rstrip(b"=").decode()
URL = "https://shl.example.org/shl/" + "A" * 43
B64URL = re.compile(r"^[A-Za-z0-9_-]+$")


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def link_for(obj: Any) -> str:
    """A link built by hand (not by shlhost) around any JSON value."""
    return "shlink:/" + b64e(json.dumps(obj).encode())


# --- round trip ----------------------------------------------------------------------------

keys = st.binary(min_size=32, max_size=32).map(b64e)
urls = st.builds(lambda host, ident: f"https://{host}/shl/{ident}",
                 st.sampled_from(["shl.example.org", "127.0.0.1:5000", "x.y"]),
                 st.binary(min_size=32, max_size=32).map(b64e))
labels = st.one_of(st.none(), st.text(min_size=1, max_size=80))
exps = st.one_of(st.none(), st.integers(min_value=0, max_value=2**41))
flags = st.sampled_from(shl.VALID_FLAGS)
viewers = st.one_of(st.none(), st.sampled_from(["https://viewer.example.org/view", "http://127.0.0.1:5000/view",
                                                 "https://v.example/app?lang=fr"]))


@settings(max_examples=200, deadline=None, database=None)
@given(url=urls, key=keys, exp=exps, flag=flags, label=labels, viewer=viewers)
def test_encode_decode_round_trip(url: str, key: str, exp: int | None, flag: str, label: str | None,
                                  viewer: str | None) -> None:
    original = Payload(url=url, key=key, exp=exp, flag=flag, label=label)
    link = encode(original, viewer)
    if viewer:
        assert link.startswith(viewer + "#shlink:/")
    else:
        assert link.startswith("shlink:/")
    assert decode(link) == original

    # The payload, decoded by hand, is the minified JSON the spec asks for.
    body = link.split("#", 1)[-1][len("shlink:/"):]
    assert B64URL.match(body)
    data = json.loads(b64d(body).decode("utf-8"))
    assert data["url"] == url and data["key"] == key and data["v"] == 1
    assert data.get("exp") == exp
    assert data.get("flag", "") == flag
    assert data.get("label") == label
    assert set(data) <= {"url", "key", "exp", "flag", "label", "v"}


def test_payload_json_is_minified_and_base64url_without_padding() -> None:
    # A label chosen so that standard base64 would contain '+' and '/' and need padding.
    p = Payload(url=URL, key=KEY, exp=1700000000, flag="LP", label="Ada's records >>> ???")
    link = encode(p)
    body = link[len("shlink:/"):]
    raw = b64d(body)
    assert raw == json.dumps(p.to_json(), separators=(",", ":"), ensure_ascii=False).encode()
    assert b": " not in raw and b", " not in raw and b"\n" not in raw
    assert "=" not in body
    standard = base64.b64encode(raw).decode()
    assert "+" in standard or "/" in standard  # the label really exercises the url-safe alphabet
    assert "+" not in body and "/" not in body
    assert body == standard.rstrip("=").replace("+", "-").replace("/", "_")


def test_unicode_label_is_utf8_not_escaped() -> None:
    p = Payload(url=URL, key=KEY, label="Ärztin – 日本語 😀")
    raw = b64d(encode(p)[len("shlink:/"):])
    assert "Ärztin – 日本語 😀".encode() in raw
    assert decode(encode(p)).label == "Ärztin – 日本語 😀"


def test_optional_fields_are_left_out_when_empty() -> None:
    raw = json.loads(b64d(encode(Payload(url=URL, key=KEY))[len("shlink:/"):]))
    assert raw == {"url": URL, "key": KEY, "v": 1}


# --- decoding links made elsewhere ----------------------------------------------------------


def test_decode_viewer_prefixed_link() -> None:
    bare = link_for({"url": URL, "key": KEY, "flag": "P", "label": "x"})
    for viewer in ("https://viewer.example.org/", "https://viewer.example.org/view", "https://v.example/#/a?b=c"):
        got = decode(f"{viewer}#{bare}")
        assert got == Payload(url=URL, key=KEY, flag="P", label="x", v=None)


def test_decode_tolerates_surrounding_whitespace() -> None:
    assert decode("  " + link_for({"url": URL, "key": KEY}) + "\n").key == KEY


def test_decode_ignores_unknown_properties() -> None:
    got = decode(link_for({"url": URL, "key": KEY, "_ext": {"x": 1}, "future": [1, 2], "v": 1, "exp": 5}))
    assert got == Payload(url=URL, key=KEY, exp=5, v=1)


@pytest.mark.parametrize(("flag", "known"), [("LXP", "LP"), ("Z", ""), ("L?", "L"), ("PQRSTU", "PU"), ("", "")])
def test_decode_ignores_unknown_flags(flag: str, known: str) -> None:
    assert decode(link_for({"url": URL, "key": KEY, "flag": flag})).flag == known


def test_decode_ignores_label_and_v_of_the_wrong_type() -> None:
    got = decode(link_for({"url": URL, "key": KEY, "label": 42, "v": "1"}))
    assert got.label is None and got.v is None


def test_decode_accepts_numeric_exp() -> None:
    assert decode(link_for({"url": URL, "key": KEY, "exp": 1700000000})).exp == 1700000000
    assert decode(link_for({"url": URL, "key": KEY, "exp": 1700000000.75})).exp == 1700000000


@pytest.mark.parametrize("length", [0, 42, 44, 86])
def test_key_must_be_43_characters(length: int) -> None:
    key = (KEY * 3)[:length]
    with pytest.raises(BadRequest) as exc:
        decode(link_for({"url": URL, "key": key}))
    assert exc.value.code == "not_a_link"


@pytest.mark.parametrize("key", ["+" + KEY[1:], KEY[:-1] + "=", KEY[:-1] + "/", 12345, None])
def test_key_must_be_base64url(key: Any) -> None:
    with pytest.raises(BadRequest) as exc:
        decode(link_for({"url": URL, "key": key}))
    assert exc.value.code == "not_a_link"


def test_a_43_character_key_is_accepted() -> None:
    key = b64e(os.urandom(32))
    assert len(key) == 43
    assert decode(link_for({"url": URL, "key": key})).key == key


NOT_LINKS: list[Any] = [
    "",
    "hello",
    "https://example.org/",
    "shlink:/",
    "shlink:/!!!!",
    "shlink:/" + b64e(b"not json"),
    "shlink:/" + b64e(b"\xff\xfe\xfd"),
    "shlink:/" + b64e(b"[1,2,3]"),
    "shlink:/" + b64e(b'"a string"'),
    link_for({"key": KEY}),
    link_for({"url": "ftp://example.org/x", "key": KEY}),
    link_for({"url": 5, "key": KEY}),
    link_for({"url": URL}),
    link_for({"url": URL, "key": KEY, "exp": "tomorrow"}),
    link_for({"url": URL, "key": KEY, "flag": ["L"]}),
    "https://viewer.example.org/" + link_for({"url": URL, "key": KEY}),  # no '#' before shlink:/
    "xshlink:/" + b64e(json.dumps({"url": URL, "key": KEY}).encode()),
    None,
    42,
    b"shlink:/abc",
]


@pytest.mark.parametrize("text", NOT_LINKS)
def test_not_a_link_is_rejected(text: Any) -> None:
    with pytest.raises(BadRequest) as exc:
        decode(text)
    assert exc.value.code == "not_a_link"
    assert exc.value.status == 400


# --- flags ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("letters", "flag"),
    [("", ""), ("L", "L"), ("P", "P"), ("U", "U"), ("LP", "LP"), ("PL", "LP"), ("LU", "LU"), ("UL", "LU")],
)
def test_normalise_flags(letters: str, flag: str) -> None:
    assert normalise_flags(letters) == flag


@pytest.mark.parametrize(
    "letters",
    ["UP", "PU", "LPU", "ULP", "LL", "PP", "LPL", "UU", "X", "l", "p", "LX", "S", "L ", " ", "LP,", None, 1, ["L"]],
)
def test_normalise_flags_rejects(letters: Any) -> None:
    with pytest.raises(BadRequest) as exc:
        normalise_flags(letters)
    assert exc.value.code == "invalid_flags"


def test_valid_flags_are_exactly_the_spec_set() -> None:
    assert set(shl.VALID_FLAGS) == {"", "L", "P", "U", "LP", "LU"}
    for flag in shl.VALID_FLAGS:
        assert flag == "".join(sorted(flag))
