"""Stateless HMAC tickets for file locations: valid only for their link, file and lifetime."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from shlhost.shl import tickets

SECRET = tickets.derive_secret("test-secret-key")
LINK = "L" * 43
FILE = "f1"
NOW = 1_700_000_000.25


def flip_char(text: str, index: int) -> str:
    """Change one base64url character to another that carries different bits."""
    c = text[index]
    return text[:index] + ("B" if c != "B" else "C") + text[index + 1:]


def test_issue_and_check() -> None:
    ticket = tickets.issue(SECRET, LINK, FILE, NOW, 300)
    assert tickets.check(SECRET, ticket, LINK, FILE, NOW)
    assert tickets.check(SECRET, ticket, LINK, FILE, NOW + 299)


def test_ticket_format_is_expiry_dot_hmac() -> None:
    ticket = tickets.issue(SECRET, LINK, FILE, NOW, 300)
    exp_text, mac_text = ticket.split(".")
    assert int(exp_text) == int(NOW) + 300
    assert "=" not in mac_text
    mac = base64.urlsafe_b64decode(mac_text + "=")
    expected = hmac.new(SECRET, f"{LINK}|{FILE}|{int(NOW) + 300}".encode(), hashlib.sha256).digest()
    assert mac == expected


def test_derive_secret_depends_on_secret_key() -> None:
    assert tickets.derive_secret("a") != tickets.derive_secret("b")
    assert tickets.derive_secret("a") == tickets.derive_secret("a")
    assert len(tickets.derive_secret("a")) == 32


def test_wrong_link_id() -> None:
    ticket = tickets.issue(SECRET, LINK, FILE, NOW, 300)
    assert not tickets.check(SECRET, ticket, "M" * 43, FILE, NOW)


def test_wrong_file_id() -> None:
    ticket = tickets.issue(SECRET, LINK, FILE, NOW, 300)
    assert not tickets.check(SECRET, ticket, LINK, "f2", NOW)


def test_link_and_file_cannot_be_shifted_across_the_separator() -> None:
    ticket = tickets.issue(SECRET, "ab", "c", NOW, 300)
    assert tickets.check(SECRET, ticket, "ab", "c", NOW)
    assert not tickets.check(SECRET, ticket, "a", "bc", NOW)


def test_expired_at_and_after_expiry() -> None:
    ticket = tickets.issue(SECRET, LINK, FILE, NOW, 300)
    expires = int(NOW) + 300
    assert tickets.check(SECRET, ticket, LINK, FILE, expires - 0.001)
    assert not tickets.check(SECRET, ticket, LINK, FILE, expires)
    assert not tickets.check(SECRET, ticket, LINK, FILE, expires + 1)
    assert not tickets.check(SECRET, ticket, LINK, FILE, expires + 86400)


@pytest.mark.parametrize("index", [0, 10, 21, 30, 41])
def test_tampered_mac(index: int) -> None:
    ticket = tickets.issue(SECRET, LINK, FILE, NOW, 300)
    exp_text, mac_text = ticket.split(".")
    assert not tickets.check(SECRET, f"{exp_text}.{flip_char(mac_text, index)}", LINK, FILE, NOW)


def test_truncated_or_extended_mac() -> None:
    ticket = tickets.issue(SECRET, LINK, FILE, NOW, 300)
    assert not tickets.check(SECRET, ticket[:-4], LINK, FILE, NOW)
    assert not tickets.check(SECRET, ticket + "AAAA", LINK, FILE, NOW)


@pytest.mark.parametrize("delta", [1, 3600, 10**6, -1])
def test_tampered_expiry(delta: int) -> None:
    ticket = tickets.issue(SECRET, LINK, FILE, NOW, 300)
    exp_text, mac_text = ticket.split(".")
    assert not tickets.check(SECRET, f"{int(exp_text) + delta}.{mac_text}", LINK, FILE, NOW)


def test_different_secret() -> None:
    ticket = tickets.issue(SECRET, LINK, FILE, NOW, 300)
    assert not tickets.check(tickets.derive_secret("another-secret"), ticket, LINK, FILE, NOW)


GARBAGE = [
    "",
    ".",
    "..",
    "abc",
    "1700000300",
    "1700000300.",
    ".AAAA",
    "1700000300.!!!!",
    "1700000300.a",
    "-1700000300.AAAA",
    "+1700000300.AAAA",
    " 1700000300.AAAA",
    "1e10.AAAA",
    "9999999999999.AAAA",
    "1700000300.AAAA.AAAA",
    "x" * 10000,
]


@pytest.mark.parametrize("garbage", GARBAGE)
def test_garbage_strings(garbage: str) -> None:
    assert tickets.check(SECRET, garbage, LINK, FILE, NOW) is False


@pytest.mark.parametrize("garbage", [None, 1700000300, b"1700000300.AAAA"])
def test_non_strings(garbage: object) -> None:
    assert tickets.check(SECRET, garbage, LINK, FILE, NOW) is False  # type: ignore[arg-type]


@pytest.mark.parametrize("garbage", ["\u00b2.AAAA", "\u00b9\u00b2\u00b3.AAAA"])
def test_unicode_digit_garbage_is_false_not_an_exception(garbage: str) -> None:
    assert tickets.check(SECRET, garbage, LINK, FILE, NOW) is False
