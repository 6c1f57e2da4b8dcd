"""A SMART Health Links client: resolve any conformant link from any server.

Usable as a library (no Flask)::

    from shlhost.client import ShlClient
    with ShlClient(recipient="Dr Example").resolve(link, passcode="1234") as resolved:
        bundle = resolved.bundle()      # every file merged as one collection Bundle

Handles bare and viewer-prefixed ``shlink:/`` links, manifest links (POST) and U links
(GET ``?recipient=``), embedded and location files (a location that answers 404 because
its ticket expired is retried once through a fresh manifest), ``zip: DEF``, and the three
content types: ``application/fhir+json``, ``application/smart-health-card`` (each JWS
decoded; its ES256 signature verified when the issuer's JWKS can be fetched, reported
``unverified`` otherwise) and ``application/smart-api-access`` (reported, not followed).

Errors are ``ShlError`` subclasses that say what happened. Neither keys nor links are
ever logged: only the host of the manifest URL.

Files stream: a location's JWE is read a chunk at a time into a spooled temporary file
(refused as soon as it passes the client's ``max_file``, 1 GiB by default) and decrypted
into another; ``ShlFile.plaintext`` is that file (FHIR and API access files) and
``ShlFile.content`` parses it when first asked (small files at once). ``Resolved`` holds
temporary files: use it as a context manager, as above, or call ``close()``.
"""

from __future__ import annotations

import io
import ipaddress
import json
import logging
import socket
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import IO, Any
from urllib.parse import urlencode, urlsplit

import requests
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from shlhost import __version__
from shlhost.crypto import jwe
from shlhost.crypto.b64 import b64url_decode
from shlhost.errors import BadRequest, DecryptionError
from shlhost.phr import fhir
from shlhost.shl import payload as shl_payload

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
SHC = "application/smart-health-card"
API_ACCESS = "application/smart-api-access"
USER_AGENT = f"shlhost-client/{__version__} (+https://shlhost.dev)"
MAX_FILE = 1024 * 1024 * 1024  # default cap on one file: its JWE, and its inflated plaintext
MAX_CARD = 64 * 1024 * 1024  # cap on a health card's payload, inflated in memory
SPOOL = 1024 * 1024  # temporary files stay in memory up to this size
READ_CHUNK = 256 * 1024


# -- errors ---------------------------------------------------------------------------------


class ShlError(Exception):
    """Something went wrong resolving a link; ``kind`` names it for programs."""

    kind = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotALink(ShlError):
    kind = "not_a_link"


class DeadLink(ShlError):
    """404: unknown, expired, revoked, paused, used up or locked (servers do not say which)."""

    kind = "dead_link"


class PasscodeRequired(ShlError):
    kind = "passcode_required"


class WrongPasscode(ShlError):
    kind = "wrong_passcode"

    def __init__(self, message: str, remaining_attempts: int | None) -> None:
        super().__init__(message)
        self.remaining_attempts = remaining_attempts


class LinkExpired(ShlError):
    kind = "expired"


class DecryptionFailed(ShlError):
    kind = "decryption_failed"


class RateLimited(ShlError):
    kind = "rate_limited"

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RefusedAddress(ShlError):
    """The link points at an address this client was told not to reach (a server pulling
    on behalf of its users refuses loopback and private networks)."""

    kind = "refused_address"


class ServerError(ShlError):
    """An answer the protocol does not allow (5xx, wrong shape, unreachable server)."""

    kind = "server_error"


class FileTooLarge(ServerError):
    """A file larger than the client's ``max_file``: refused while it was being read."""

    kind = "file_too_large"


# -- results --------------------------------------------------------------------------------


@dataclass
class HealthCard:
    issuer: str | None
    verification: str  # "verified", "unverified" (no key to be had) or "invalid"
    payload: dict[str, Any]
    bundle: dict[str, Any] | None


_UNPARSED: Any = object()


@dataclass
class ShlFile:
    index: int
    content_type: str
    last_updated: str | None
    origin: str  # "embedded", "location" or "direct" (U links)
    cards: list[HealthCard] = field(default_factory=list)
    skipped: bool = False  # not fetched: its lastUpdated did not change
    # The decrypted file (binary, positioned at 0 when handed out), for fhir+json and
    # smart-api-access files; a spooled temporary file that close() closes.
    plaintext: IO[bytes] | None = field(default=None, repr=False)
    _content: Any = field(default=_UNPARSED, repr=False)

    @property
    def content(self) -> Any:
        """The parsed JSON of fhir+json and smart-api-access files (parsed when first
        asked; None for other files). Raises ``DecryptionFailed`` if it is not JSON."""
        if self._content is _UNPARSED:
            self._content = None if self.plaintext is None else _parse_json(self)
        return self._content

    @content.setter
    def content(self, value: Any) -> None:
        self._content = value

    def close(self) -> None:
        if self.plaintext is not None:
            self.plaintext.close()

    def __enter__(self) -> ShlFile:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _parse_json(f: ShlFile) -> Any:
    assert f.plaintext is not None
    if f.plaintext.closed:
        raise ValueError(f"file {f.index} was closed before its content was asked for")
    f.plaintext.seek(0)
    data = f.plaintext.read()
    f.plaintext.seek(0)
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise DecryptionFailed(f"file {f.index} decrypts to something that is not JSON") from None


@dataclass
class Resolved:
    payload: shl_payload.Payload
    status: str | None
    files: list[ShlFile]
    server_date: datetime | None = None  # the manifest answer's Date header

    def close(self) -> None:
        """Close every file's temporary plaintext."""
        for f in self.files:
            f.close()

    def __enter__(self) -> Resolved:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def settled_updates(self) -> dict[str, str]:
        """File position -> lastUpdated, for the files whose lastUpdated can be trusted to
        change with the next change: lastUpdated has a resolution of one second, so a
        value from the very second the server answered in may yet be followed by another
        change in that second."""
        out: dict[str, str] = {}
        for f in self.files:
            when = _instant(f.last_updated)
            if when is not None and self.server_date is not None and when < self.server_date:
                out[str(f.index)] = str(f.last_updated)
        return out

    @property
    def api_access(self) -> list[Any]:
        return [f.content for f in self.files if f.content_type == API_ACCESS and not f.skipped]

    def resources(self) -> list[dict[str, Any]]:
        """Every resource the fetched files carry, with references a Bundle expressed
        through fullUrls rewritten to ``Type/id`` (so NDJSON keeps them)."""
        out: list[dict[str, Any]] = []
        for f in self.files:
            if f.skipped:
                continue
            if f.content_type == FHIR_JSON:
                out.extend(_flatten(f.content))
            elif f.content_type == SHC:
                for card in f.cards:
                    if card.bundle is not None:
                        out.extend(_flatten(card.bundle))
        return out

    def bundle(self) -> dict[str, Any]:
        """All files merged as one collection Bundle."""
        entries = [
            {"fullUrl": f"{r['resourceType']}/{r['id']}", "resource": r} for r in self.resources()
        ]
        return {"resourceType": "Bundle", "type": "collection", "entry": entries}

    def ndjson(self) -> bytes:
        return b"".join(
            json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in self.resources()
        )


def _flatten(content: Any) -> list[dict[str, Any]]:
    if not isinstance(content, dict) or not isinstance(content.get("resourceType"), str):
        return []
    if content["resourceType"] != "Bundle":
        return [content]
    entries = [
        e
        for e in content.get("entry") or []
        if isinstance(e, dict) and isinstance(e.get("resource"), dict)
    ]
    refs: dict[str, str] = {}
    resources = []
    for entry in entries:
        resource = dict(entry["resource"])
        if not isinstance(resource.get("resourceType"), str):
            continue
        rid = resource.get("id")
        full = entry.get("fullUrl") if isinstance(entry.get("fullUrl"), str) else None
        if not isinstance(rid, str) or not fhir.ID_RE.fullmatch(rid):
            if full and full.startswith("urn:uuid:") and fhir.ID_RE.fullmatch(full[9:]):
                rid = full[9:]
            elif full:
                rid = str(uuid.uuid5(uuid.NAMESPACE_URL, full))
            else:
                rid = fhir.derived_id(resource)
            resource["id"] = rid
        if full:
            refs[full] = f"{resource['resourceType']}/{rid}"
        resources.append(resource)
    if not refs:
        return resources
    return [fhir.rewrite_references(r, refs.get) for r in resources]


# -- the client -----------------------------------------------------------------------------


class ShlClient:
    def __init__(
        self,
        recipient: str = "shlhost",
        *,
        timeout: float = 30.0,
        max_retries: int = 3,
        max_wait: float = 60.0,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
        verify_cards: bool = True,
        jwks_timeout: float = 5.0,
        now: Callable[[], float] = time.time,
        allow_url: Callable[[str], bool] | None = None,
        max_file: int = MAX_FILE,
    ) -> None:
        self.recipient = recipient
        self.max_file = max_file  # bytes: a file's JWE, and its plaintext once inflated
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_wait = max_wait
        self.http = session or requests.Session()
        self.http.headers["User-Agent"] = USER_AGENT
        self.sleep = sleep
        self.verify_cards = verify_cards
        self.jwks_timeout = jwks_timeout
        self.now = now
        self.allow_url = allow_url
        self._jwks: dict[str, dict[str, Any] | None] = {}

    # -- entry points -----------------------------------------------------------------------

    @staticmethod
    def parse(link: str) -> shl_payload.Payload:
        try:
            return shl_payload.decode(link)
        except BadRequest as exc:
            raise NotALink(exc.message) from None

    def resolve(
        self,
        link: str | shl_payload.Payload,
        passcode: str | None = None,
        *,
        embedded_length_max: int | None = None,
        known_updates: dict[str, str] | None = None,
    ) -> Resolved:
        """Fetch and decrypt every file of ``link``. Files whose ``lastUpdated`` equals the
        one in ``known_updates`` (file position -> lastUpdated) are not fetched."""
        p = link if isinstance(link, shl_payload.Payload) else self.parse(link)
        if p.exp is not None and p.exp < self.now():
            raise LinkExpired("the link has expired (its exp is in the past)")
        key = b64url_decode(p.key)
        if "U" in p.flag:
            with self._get_jwe(p.url, {"recipient": self.recipient}) as token:
                return Resolved(p, None, [self._open(0, token, key, None, None, "direct")])
        if "P" in p.flag and not passcode:
            raise PasscodeRequired("the link needs a passcode (flag P)")
        manifest = self._manifest(p, passcode, embedded_length_max)
        server_date = manifest.pop("_date", None)
        files: list[ShlFile] = []
        try:
            for index, entry in enumerate(manifest["files"]):
                files.append(
                    self._file(p, passcode, embedded_length_max, index, entry, key, known_updates)
                )
        except BaseException:
            for f in files:
                f.close()
            raise
        return Resolved(p, manifest.get("status"), files, server_date)

    def _file(
        self,
        p: shl_payload.Payload,
        passcode: str | None,
        embedded_length_max: int | None,
        index: int,
        entry: dict[str, Any],
        key: bytes,
        known_updates: dict[str, str] | None,
    ) -> ShlFile:
        ctype, updated = entry.get("contentType"), entry.get("lastUpdated")
        if known_updates is not None and updated and known_updates.get(str(index)) == updated:
            return ShlFile(index, str(ctype), updated, "skipped", skipped=True)
        if isinstance(entry.get("embedded"), str):
            embedded = io.BytesIO(entry["embedded"].encode("ascii", "replace"))
            return self._open(index, embedded, key, ctype, updated, "embedded")
        location = entry.get("location")
        if not isinstance(location, str):
            raise ServerError(f"manifest file {index} has neither embedded nor location")
        try:
            token = self._get_jwe(location, None)
        except DeadLink:
            # The location's ticket may have expired between the manifest and now: ask
            # the manifest once more for a fresh one.
            log.info("a file location of %s answered 404; asking the manifest again", _host(p.url))
            again = self._manifest(p, passcode, embedded_length_max)["files"]
            if index >= len(again) or not isinstance(again[index].get("location"), str):
                raise
            token = self._get_jwe(again[index]["location"], None)
        with token:
            return self._open(index, token, key, ctype, updated, "location")

    # -- HTTP -------------------------------------------------------------------------------

    def _request(self, method: str, url: str, **kw: Any) -> requests.Response:
        """One request, retried on 429 after its Retry-After (bounded); connection errors
        become ServerError."""
        if self.allow_url is not None and not self.allow_url(url):
            raise RefusedAddress(f"refusing to fetch from {_host(url)}: not a public address")
        waited = 0.0
        for attempt in range(self.max_retries + 1):
            try:
                resp = self.http.request(
                    method, url, timeout=self.timeout, allow_redirects=False, **kw
                )
            except requests.RequestException as exc:
                raise ServerError(f"could not reach {_host(url)} ({type(exc).__name__})") from None
            if resp.status_code != 429:
                return resp
            resp.close()
            delay = _retry_after(resp.headers.get("Retry-After"))
            if attempt >= self.max_retries or delay is None or waited + delay > self.max_wait:
                raise RateLimited(
                    f"{_host(url)} is rate limiting this client"
                    + (f" (retry after {delay:g} s)" if delay is not None else ""),
                    delay,
                )
            log.info("%s answered 429; waiting %.1f s (Retry-After)", _host(url), delay)
            self.sleep(delay)
            waited += delay
        raise AssertionError("unreachable")

    def _manifest(
        self, p: shl_payload.Payload, passcode: str | None, embedded_max: int | None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"recipient": self.recipient}
        if passcode:
            body["passcode"] = passcode
        if embedded_max is not None:
            body["embeddedLengthMax"] = embedded_max
        resp = self._request("POST", p.url, json=body, headers={"Accept": "application/json"})
        if resp.status_code == 401:
            remaining = None
            try:
                data = resp.json()
                if isinstance(data, dict) and isinstance(data.get("remainingAttempts"), int):
                    remaining = data["remainingAttempts"]
            except ValueError:
                pass
            if not passcode:
                raise PasscodeRequired("the link needs a passcode")
            left = f" ({remaining} attempts left)" if remaining is not None else ""
            raise WrongPasscode(f"wrong passcode{left}", remaining)
        self._check(resp, "the manifest")
        try:
            data = resp.json()
        except ValueError:
            raise ServerError("the manifest is not JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("files"), list):
            raise ServerError("the manifest has no files list")
        if data.get("status") == "no-longer-valid":
            raise DeadLink("the link is no longer valid (manifest status no-longer-valid)")
        data["_date"] = _http_date(resp.headers.get("Date"))
        return data

    def _get_jwe(self, url: str, params: dict[str, str] | None) -> IO[bytes]:
        """The file at ``url``, read a chunk at a time into a spooled temporary file (the
        caller closes it); refused as soon as it is larger than ``max_file``."""
        if params:
            url = url + ("&" if "?" in url else "?") + urlencode(params)
        too_large = FileTooLarge(
            f"the file is larger than this client accepts ({_size(self.max_file)})"
        )
        with self._request("GET", url, headers={"Accept": "application/jose"}, stream=True) as resp:
            self._check(resp, "the file")
            declared = resp.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_file:
                raise too_large
            out = tempfile.SpooledTemporaryFile(max_size=SPOOL)  # noqa: SIM115 - returned
            try:
                total = 0
                for chunk in resp.iter_content(READ_CHUNK):
                    total += len(chunk)
                    if total > self.max_file:
                        raise too_large
                    out.write(chunk)
            except requests.RequestException as exc:
                out.close()
                raise ServerError(
                    f"the file from {_host(url)} could not be read ({type(exc).__name__})"
                ) from None
            except BaseException:
                out.close()
                raise
        out.seek(0)
        return out

    @staticmethod
    def _check(resp: requests.Response, what: str) -> None:
        if resp.status_code == 404:
            raise DeadLink(
                "dead link: the server does not know it, or it expired, was revoked or used up"
            )
        if resp.status_code == 401:
            raise PasscodeRequired(f"{what} needs a passcode")
        if resp.status_code != 200:
            raise ServerError(f"{what} answered HTTP {resp.status_code}")

    # -- files ------------------------------------------------------------------------------

    def _open(
        self, index: int, token: IO[bytes], key: bytes, ctype: Any, updated: Any, origin: str
    ) -> ShlFile:
        """Decrypt the JWE in seekable ``token`` into a spooled temporary file."""
        plaintext: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL)  # noqa: SIM115
        try:
            try:
                header = jwe.decrypt_stream(token, plaintext, key, max_inflated=self.max_file)
            except (DecryptionError, BadRequest) as exc:
                # What was written is not authentic: it is thrown away with the file.
                raise DecryptionFailed(
                    f"file {index} does not decrypt with the link's key ({exc.message})"
                ) from None
            small = plaintext.tell() <= SPOOL
            plaintext.seek(0)
            if small:
                # Still in memory: as a BytesIO it needs no closing (a spool left open warns).
                spool, plaintext = plaintext, io.BytesIO(plaintext.read())
                spool.close()
            content_type = str(ctype or header.get("cty") or "")
            out = ShlFile(
                index,
                content_type,
                updated if isinstance(updated, str) else None,
                origin,
                plaintext=plaintext,
            )
            if content_type == SHC:
                content = out.content
                creds = content.get("verifiableCredential") if isinstance(content, dict) else None
                if not isinstance(creds, list):
                    raise ServerError(
                        f"file {index} is a SMART Health Card file without verifiableCredential"
                    )
                out.cards = [self.decode_card(jws) for jws in creds if isinstance(jws, str)]
                plaintext.close()
                out.plaintext, out.content = None, None
            elif small:
                out.content  # noqa: B018 - small files are checked (and parsed) at once
        except BaseException:
            plaintext.close()
            raise
        return out

    # -- SMART Health Cards -----------------------------------------------------------------

    def decode_card(self, jws: str) -> HealthCard:
        parts = jws.strip().split(".")
        if len(parts) != 3:
            raise ServerError("a SMART Health Card is not a compact JWS")
        try:
            header = json.loads(b64url_decode(parts[0]))
            raw = b64url_decode(parts[1])
            if header.get("zip") == "DEF":
                raw = jwe.inflate(raw, MAX_CARD)
            body = json.loads(raw)
            signature = b64url_decode(parts[2])
        except (ValueError, UnicodeDecodeError, DecryptionError):
            raise ServerError("a SMART Health Card payload is not base64url DEFLATE JSON") from None
        issuer = body.get("iss") if isinstance(body.get("iss"), str) else None
        verification = "unverified"
        if self.verify_cards and issuer and header.get("alg") == "ES256":
            verification = self._verify(
                issuer, header.get("kid"), f"{parts[0]}.{parts[1]}".encode(), signature
            )
        subject = (body.get("vc") or {}).get("credentialSubject") or {}
        bundle = subject.get("fhirBundle") if isinstance(subject, dict) else None
        if isinstance(bundle, dict):
            # Cards reference entries as resource:N; give each entry a stable id instead.
            seed = f"{issuer}|{parts[2]}"
            to_urn = _card_ref(seed)

            def local(ref: str) -> str | None:
                return to_urn(ref) if ref.startswith("resource:") else None

            bundle = dict(bundle)
            bundle["entry"] = [
                {**e, "fullUrl": e.get("fullUrl") or f"resource:{i}"} if isinstance(e, dict) else e
                for i, e in enumerate(bundle.get("entry") or [])
            ]
            bundle["entry"] = [
                {
                    **e,
                    "fullUrl": _card_ref(seed)(str(e["fullUrl"])),
                    "resource": fhir.rewrite_references(e.get("resource"), local),
                }
                if isinstance(e, dict)
                else e
                for e in bundle["entry"]
            ]
        return HealthCard(issuer, verification, body, bundle if isinstance(bundle, dict) else None)

    def _verify(self, issuer: str, kid: Any, signed: bytes, signature: bytes) -> str:
        jwks = self._issuer_keys(issuer)
        if jwks is None:
            return "unverified"
        for jwk in jwks.get("keys") or []:
            if not isinstance(jwk, dict) or (kid is not None and jwk.get("kid") != kid):
                continue
            if jwk.get("kty") != "EC" or jwk.get("crv") != "P-256" or len(signature) != 64:
                continue
            try:
                public = ec.EllipticCurvePublicNumbers(
                    int.from_bytes(b64url_decode(jwk["x"]), "big"),
                    int.from_bytes(b64url_decode(jwk["y"]), "big"),
                    ec.SECP256R1(),
                ).public_key()
                der = encode_dss_signature(
                    int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
                )
                public.verify(der, signed, ec.ECDSA(hashes.SHA256()))
                return "verified"
            except (InvalidSignature, ValueError, KeyError):
                return "invalid"
        return "unverified"

    def _issuer_keys(self, issuer: str) -> dict[str, Any] | None:
        if issuer not in self._jwks:
            found = None
            if self.allow_url is not None and not self.allow_url(issuer):
                self._jwks[issuer] = None
                return None
            try:
                resp = self.http.get(
                    issuer.rstrip("/") + "/.well-known/jwks.json",
                    timeout=self.jwks_timeout,
                    allow_redirects=False,
                )
                if resp.status_code == 200:
                    data = resp.json()
                    found = data if isinstance(data, dict) else None
            except (requests.RequestException, ValueError):
                found = None
            self._jwks[issuer] = found
        return self._jwks[issuer]


def _card_ref(seed: str) -> Callable[[str], str]:
    """Card entries are ``resource:N``: a stable urn:uuid per card and entry instead."""

    def fix(ref: str) -> str:
        return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, seed + '|' + ref)}"

    return fix


def public_only(url: str) -> bool:
    """``allow_url`` for servers: only http(s) URLs whose host resolves to public addresses
    (no loopback, private, link-local, multicast or reserved ranges)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return True  # unresolvable: the request itself will fail and say so
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if (
            ip.is_private
            or ip.is_loopback
            or ip.is_link_local
            or ip.is_multicast
            or ip.is_reserved
            or ip.is_unspecified
        ):
            return False
    return True


def _size(n: int) -> str:
    return f"{n / (1 << 30):g} GiB" if n >= 1 << 30 else f"{n / (1 << 20):g} MiB"


def _instant(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _http_date(value: str | None) -> datetime | None:
    try:
        return parsedate_to_datetime(value) if value else None
    except (TypeError, ValueError):
        return None


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _host(url: str) -> str:
    """What may be logged of a URL: its host (manifest paths are secrets)."""
    return urlsplit(url).netloc or "?"
