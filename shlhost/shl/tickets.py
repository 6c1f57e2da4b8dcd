"""Stateless HMAC tickets that authorise one file fetch for a few minutes.

A ticket is ``<expiry epoch seconds>.<base64url HMAC-SHA256(secret, link|file|expiry)>``.
Nothing is stored: the server's secret, the path and the clock are enough to check it.
"""

from __future__ import annotations

import hashlib
import hmac
import re

from shlhost.crypto.b64 import b64url_decode, b64url_encode

_CONTEXT = b"shlhost-ticket-v1"
_EXPIRY = re.compile(r"[1-9][0-9]{0,11}")


def derive_secret(secret_key: str) -> bytes:
    """A ticket key derived from SECRET_KEY, so rotating SECRET_KEY invalidates all tickets."""
    return hmac.new(secret_key.encode(), _CONTEXT, hashlib.sha256).digest()


def _mac(secret: bytes, link_id: str, file_id: str, expires: int) -> bytes:
    msg = f"{link_id}|{file_id}|{expires}".encode()
    return hmac.new(secret, msg, hashlib.sha256).digest()


def issue(secret: bytes, link_id: str, file_id: str, now: float, lifetime: int) -> str:
    expires = int(now) + lifetime
    return f"{expires}.{b64url_encode(_mac(secret, link_id, file_id, expires))}"


def check(secret: bytes, ticket: str, link_id: str, file_id: str, now: float) -> bool:
    """True when the ticket was made for this link and file by us and has not expired."""
    if not isinstance(ticket, str) or ticket.count(".") != 1:
        return False
    exp_text, mac_text = ticket.split(".")
    if not _EXPIRY.fullmatch(exp_text):
        return False
    try:
        mac = b64url_decode(mac_text)
    except ValueError:
        return False
    expires = int(exp_text)
    good = hmac.compare_digest(mac, _mac(secret, link_id, file_id, expires))
    return good and now < expires
