"""The SHL payload: ``shlink:/`` + base64url(minified JSON), optionally behind a viewer URL."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from shlhost.crypto.b64 import b64url_decode, b64url_encode
from shlhost.errors import BadRequest

PREFIX = "shlink:/"
VALID_FLAGS = ("", "L", "P", "U", "LP", "LU")
LABEL_MAX = 80
URL_MAX = 128
_KEY = re.compile(r"[A-Za-z0-9_-]{43}")


@dataclass(frozen=True)
class Payload:
    url: str
    key: str
    exp: int | None = None
    flag: str = ""
    label: str | None = None
    v: int | None = 1

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"url": self.url, "key": self.key}
        if self.exp is not None:
            out["exp"] = self.exp
        if self.flag:
            out["flag"] = self.flag
        if self.label:
            out["label"] = self.label
        if self.v is not None:
            out["v"] = self.v
        return out


def normalise_flags(letters: str) -> str:
    """Sort flag letters alphabetically and check the combination the spec allows."""
    if (
        not isinstance(letters, str)
        or set(letters) - set("LPU")
        or len(set(letters)) != len(letters)
    ):
        raise BadRequest(
            "flags are letters from L, P and U, each at most once", code="invalid_flags"
        )
    flag = "".join(sorted(letters))
    if flag not in VALID_FLAGS:
        raise BadRequest(
            "flag U (direct file) cannot be combined with P (passcode)", code="invalid_flags"
        )
    return flag


def encode(payload: Payload, viewer: str | None = None) -> str:
    body = json.dumps(payload.to_json(), separators=(",", ":"), ensure_ascii=False)
    link = PREFIX + b64url_encode(body.encode("utf-8"))
    return f"{viewer}#{link}" if viewer else link


def decode(link: str) -> Payload:
    """Parse a bare or viewer-prefixed link; ignore unknown properties and flags."""
    if not isinstance(link, str):
        raise BadRequest("not a SMART Health Link", code="not_a_link")
    text = link.strip()
    at = text.find(PREFIX)
    if at < 0 or (at > 0 and text[at - 1] != "#"):
        raise BadRequest("not a SMART Health Link (no shlink:/ payload)", code="not_a_link")
    try:
        data = json.loads(b64url_decode(text[at + len(PREFIX) :]))
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the link payload is not base64url JSON", code="not_a_link") from None
    if not isinstance(data, dict):
        raise BadRequest("the link payload is not a JSON object", code="not_a_link")
    url, key = data.get("url"), data.get("key")
    if not isinstance(url, str) or not url.startswith(("https://", "http://")):
        raise BadRequest("the link payload has no usable url", code="not_a_link")
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise BadRequest("the link key must be 43 base64url characters", code="not_a_link")
    exp = data.get("exp")
    if exp is not None and not isinstance(exp, (int, float)):
        raise BadRequest("the link exp must be a number", code="not_a_link")
    flag = data.get("flag") or ""
    if not isinstance(flag, str):
        raise BadRequest("the link flag must be a string", code="not_a_link")
    known = "".join(c for c in flag if c in "LPU")  # receivers ignore unknown flags
    label = data.get("label")
    v = data.get("v")
    return Payload(
        url=url,
        key=key,
        exp=int(exp) if exp is not None else None,
        flag=known,
        label=label if isinstance(label, str) else None,
        v=v if isinstance(v, int) else None,
    )
