"""Record formats: NDJSON / .phr, FHIR Bundles, .sphr archives and SMART Health Card files.

Readers are lenient the way the PHR guide's real-world files need: a broken line, a string
``_id`` or a duplicate is reported as a ``Problem`` naming the line, never fatal on its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import posixpath
import re
import secrets
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

import orjson
import pybase64
import pyzipper

from shlhost.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

FHIR_JSON = "application/fhir+json"
SHC = "application/smart-health-card"
SMART_API_ACCESS = "application/smart-api-access"
SHL_CONTENT_TYPES = (FHIR_JSON, SHC, SMART_API_ACCESS)

NDJSON_SUFFIXES = (".phr", ".ndjson", ".jsonl")
ZIP_SUFFIXES = (".sphr", ".zip")
ZIP_MAGIC = b"PK\x03\x04"

# pyzipper carries its own copy of zipfile, with its own exception classes.
BAD_ZIP = (zipfile.BadZipFile, zipfile.LargeZipFile, pyzipper.BadZipFile, pyzipper.LargeZipFile)
# What reading a damaged or tampered archive can raise besides: a corrupt DEFLATE stream is
# noticed before the AES authentication code at the member's end, a corrupt header can name
# an unknown version or compression method.
DAMAGED = (*BAD_ZIP, OSError, EOFError, ValueError, zlib.error, NotImplementedError, KeyError, IndexError,
           struct.error)

# Archive limits (zip bombs): members, bytes once inflated, and inflation ratio.
MAX_MEMBERS = 10_000
MAX_RATIO = 1_000


@dataclass(frozen=True)
class Problem:
    """One issue found while reading; ``line`` is 1-based where there is one."""

    message: str
    line: int | None = None
    severity: str = "error"  # error | warning
    source: str | None = None

    def where(self) -> str:
        parts = [self.source] if self.source else []
        if self.line is not None:
            parts.append(f"line {self.line}")
        return ", ".join(parts)


def clean_resource(obj: Any, line: int | None, source: str | None) -> tuple[dict[str, Any] | None, list[Problem]]:
    """Check one decoded JSON value is a resource; mend what the IG's files get wrong."""
    if not isinstance(obj, dict):
        return None, [Problem("not a JSON object", line, source=source)]
    rtype = obj.get("resourceType")
    if not isinstance(rtype, str) or not rtype[:1].isupper() or not rtype.isalnum():
        return None, [Problem("not a FHIR resource (no valid resourceType)", line, source=source)]
    problems: list[Problem] = []
    if "_id" in obj and not isinstance(obj["_id"], dict):
        # The IG's .phr lines carry a string `_id` (a database key); FHIR wants an object.
        obj = {k: v for k, v in obj.items() if k != "_id"}
        problems.append(Problem("dropped a non-FHIR string '_id' member", line, "warning", source))
    rid = obj.get("id")
    if rid is not None and not isinstance(rid, str):
        obj = {**obj, "id": str(rid)}
        problems.append(Problem("resource id was not a string", line, "warning", source))
    return obj, problems


def iter_ndjson(lines: Iterable[bytes], source: str | None = None) -> Iterator[tuple[int, dict[str, Any] | None, list[Problem]]]:
    """Yield (line number, resource or None, problems) for each non-blank line."""
    for number, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text:
            continue
        if number == 1 and text.startswith(b"\xef\xbb\xbf"):
            text = text[3:]
        try:
            obj = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            msg = "not valid UTF-8" if "utf-8" in str(exc).lower() else f"not valid JSON ({str(exc).split(':')[0]})"
            yield number, None, [Problem(msg, number, source=source)]
            continue
        resource, problems = clean_resource(obj, number, source)
        yield number, resource, problems


def capped_lines(stream: IO[bytes], max_line: int) -> Iterator[bytes]:
    """Lines of a binary stream; a line longer than ``max_line`` is skipped to its end and
    replaced by an empty marker, so one huge line never has to fit in memory."""
    while True:
        line = stream.readline(max_line + 1)
        if not line:
            return
        if len(line) > max_line and not line.endswith(b"\n"):
            while True:  # drain the rest of the monster line
                rest = stream.readline(1 << 20)
                if not rest or rest.endswith(b"\n"):
                    break
            yield TOO_LONG
            continue
        yield line


TOO_LONG = b"\x00too-long\x00"


def iter_ndjson_stream(stream: IO[bytes], source: str | None, max_line: int) -> Iterator[tuple[int, dict[str, Any] | None, list[Problem]]]:
    for number, raw in enumerate(capped_lines(stream, max_line), start=1):
        if raw is TOO_LONG:
            yield number, None, [Problem(f"line longer than {max_line} bytes: skipped", number, source=source)]
            continue
        for _n, resource, problems in iter_ndjson([raw], source):
            yield number, resource, [Problem(p.message, number, p.severity, p.source) for p in problems]


def guess_type(name: str) -> str:
    lower = name.lower()
    for suffix, mime in (
        (".jpg", "image/jpeg"), (".jpeg", "image/jpeg"), (".png", "image/png"),
        (".gif", "image/gif"), (".webp", "image/webp"), (".pdf", "application/pdf"),
        (".dcm", "application/dicom"), (".txt", "text/plain"), (".xml", "application/xml"),
        (".json", "application/json"), (".html", "text/html"),
    ):
        if lower.endswith(suffix):
            return mime
    return "application/octet-stream"


def _junk(name: str) -> bool:
    base = posixpath.basename(name)
    return name.startswith("__MACOSX/") or base in (".DS_Store", "Thumbs.db") or base.startswith("._")


@contextlib.contextmanager
def _archive_errors() -> Iterator[None]:
    """What reading a member can raise, as the clear errors an upload deserves."""
    try:
        yield
    except RuntimeError as exc:  # pyzipper: "Bad password for file ..."
        if "password" in str(exc).lower():
            raise BadRequest("wrong password for this .sphr", code="sphr_wrong_password") from None
        raise BadRequest("the .sphr could not be read", code="invalid_sphr") from None
    except DAMAGED:
        # Checksum or authentication failures of a tampered archive land here.
        raise BadRequest("the .sphr is damaged or has been tampered with", code="invalid_sphr") from None


@dataclass
class SphrArchive:
    """A checked .sphr: its .phr members and its attachments (junk left out)."""

    archive: Any
    phr_names: list[str]
    attachment_names: list[str]

    def read(self, name: str) -> bytes:
        with _archive_errors():
            data: bytes = self.archive.read(name)
            return data

    def lines(self, name: str) -> Iterator[bytes]:
        """A .phr member line by line, without inflating it whole."""
        with _archive_errors(), self.archive.open(name) as member:
            yield from io.BufferedReader(member, 1 << 16)

    def chunks(self, name: str, size: int) -> Iterator[bytes]:
        """A member in pieces of at most ``size`` bytes, without inflating it whole."""
        with _archive_errors(), self.archive.open(name) as member:
            while chunk := member.read(size):
                yield chunk

    def size(self, name: str) -> int:
        return int(self.archive.getinfo(name).file_size)

    def close(self) -> None:
        self.archive.close()


def open_sphr(fileobj: IO[bytes], password: str | None, max_size: int) -> SphrArchive:
    """Open a .sphr: a (possibly AES-encrypted) ZIP with .phr files and attachments.

    Refuses unsafe archives outright: members outside the archive root (``../``, absolute
    paths), symlinks, too many members, or more than ``max_size`` bytes once inflated.
    """
    try:
        archive = pyzipper.AESZipFile(fileobj)
    except DAMAGED:
        raise BadRequest("the .sphr is not a readable ZIP archive", code="invalid_sphr") from None
    try:
        infos = archive.infolist()
        if len(infos) > MAX_MEMBERS:
            raise BadRequest("the .sphr has too many members", code="invalid_sphr")
        total = 0
        for info in infos:
            name = info.filename
            if name.startswith("/") or "\\" in name or ".." in name.split("/") or ":" in name.split("/")[0]:
                raise BadRequest(f"the .sphr has an unsafe member path {name!r}", code="unsafe_archive")
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise BadRequest(f"the .sphr has a symbolic link {name!r}", code="unsafe_archive")
            total += info.file_size
            if info.compress_size and info.file_size / info.compress_size > MAX_RATIO and info.file_size > 1 << 20:
                raise BadRequest("the .sphr inflates suspiciously (zip bomb?)", code="unsafe_archive")
        if total > max_size:
            raise PayloadTooLarge("the .sphr is larger than allowed once inflated", code="unsafe_archive")
        if any(info.flag_bits & 0x1 for info in infos):
            if not password:
                raise BadRequest("this .sphr is encrypted: give its password", code="sphr_password_required")
            archive.setpassword(password.encode())
        members = [i.filename for i in infos if not i.is_dir() and not _junk(i.filename)]
        phr_names = [n for n in members if n.lower().endswith(NDJSON_SUFFIXES)]
        if not phr_names:
            raise BadRequest("the .sphr holds no .phr file", code="invalid_sphr")
        return SphrArchive(archive, phr_names, [n for n in members if n not in phr_names])
    except BaseException:
        archive.close()
        raise


def attachments_of(resource: dict[str, Any]) -> Iterator[dict[str, Any]]:
    rtype = resource.get("resourceType")
    if rtype == "Media" and isinstance(resource.get("content"), dict):
        yield resource["content"]
    elif rtype == "DocumentReference":
        for content in resource.get("content") or []:
            if isinstance(content, dict) and isinstance(content.get("attachment"), dict):
                yield content["attachment"]
    elif rtype == "DiagnosticReport":
        for att in resource.get("presentedForm") or []:
            if isinstance(att, dict):
                yield att


# -- uploads made into files a link can carry ---------------------------------------------
# Everything below streams: a record of any size is read from its (spooled) upload and
# written as a Bundle to a spooled temporary file, one resource at a time; attachments go
# from the archive into the Bundle as base64 in pieces. Memory holds one resource at a time
# plus a digest per resource (to drop exact repeats), never the record or the Bundle.

SPOOL_MEMORY = 1 << 20
# ijson's C backend lexes a string token that spans reads again from its start on every
# read, so small reads make a large base64 attachment quadratic: a 53 MB one took 7 s with
# its default 64 KiB reads, 0.15 s with 8 MiB ones.
IJSON_BUFFER = 4 << 20  # a prepared file stays in memory up to this size, then goes to disk
JSON_IN_MEMORY = 16 << 20  # JSON uploads up to this size are checked in memory (faster)
BASE64_STEP = 3 * 16 * 1024


@dataclass
class PreparedFile:
    """A file ready to encrypt: its SHL content type and its plaintext, as a binary stream
    positioned at its start (a spooled temporary file for converted records)."""

    content_type: str
    source: IO[bytes]
    problems: list[Problem] = field(default_factory=list)

    @classmethod
    def from_bytes(cls, content_type: str, body: bytes, problems: list[Problem] | None = None) -> PreparedFile:
        return cls(content_type, io.BytesIO(body), problems or [])

    def close(self) -> None:
        self.source.close()


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def prepare_json(content_type: str, content: Any) -> PreparedFile:
    """A file given in a JSON request as ``{"contentType", "content"}``."""
    if content_type not in SHL_CONTENT_TYPES:
        raise UnsupportedMediaType(
            f"contentType must be one of {', '.join(SHL_CONTENT_TYPES)}", code="unknown_content_type"
        )
    if content_type == FHIR_JSON:
        if not isinstance(content, dict) or not isinstance(content.get("resourceType"), str):
            raise BadRequest("application/fhir+json content must be a FHIR resource", code="invalid_content")
    elif content_type == SHC:
        if not isinstance(content, dict) or not isinstance(content.get("verifiableCredential"), list):
            raise BadRequest(
                "application/smart-health-card content must hold a verifiableCredential list",
                code="invalid_content",
            )
    elif not isinstance(content, dict):
        raise BadRequest("application/smart-api-access content must be a JSON object", code="invalid_content")
    return PreparedFile.from_bytes(content_type, _dumps(content))


def _is_blank(stream: IO[bytes]) -> bool:
    stream.seek(0)
    while chunk := stream.read(1 << 16):
        if chunk.strip():
            stream.seek(0)
            return False
    stream.seek(0)
    return True


def prepare_upload(filename: str, stream: IO[bytes], *, password: str | None = None, max_size: int) -> PreparedFile:
    """Turn an uploaded file (a seekable binary stream) into something every SHL viewer can read.

    A Bundle or resource stays as it is; a SMART Health Card file stays a card;
    NDJSON, .phr and .sphr become one collection Bundle, written as they are read.
    """
    name = (filename or "").lower()
    label = filename or "the file"
    if _is_blank(stream):
        raise BadRequest(f"the file {filename or '(unnamed)'} is empty", code="empty_file")
    head = stream.read(1 << 16)
    stream.seek(0)
    if name.endswith(ZIP_SUFFIXES) or head.startswith(ZIP_MAGIC):
        return _sphr_file(stream, password, max_size)
    if name.endswith(NDJSON_SUFFIXES):
        return _ndjson_file(stream, filename)
    kind, stream = _json_kind(stream)
    if kind == "not-json" and head.lstrip()[:1] == b"{" and _has_two_lines(stream):
        return _ndjson_file(stream, filename)
    if kind == SHC:
        return PreparedFile(SHC, stream)
    if name.endswith(".smart-health-card") and kind != "not-json":
        raise BadRequest("a .smart-health-card file must hold a verifiableCredential list", code="invalid_content")
    if kind == FHIR_JSON:
        return PreparedFile(FHIR_JSON, stream)
    if kind == "other-json":
        raise UnsupportedMediaType(
            f"{label} is JSON but neither a FHIR resource nor a SMART Health Card",
            code="unknown_content_type",
        )
    raise UnsupportedMediaType(
        f"{label} is not a FHIR Bundle, NDJSON/.phr, .sphr or SMART Health Card file",
        code="unknown_content_type",
    )


def _json_kind(stream: IO[bytes]) -> tuple[str, IO[bytes]]:
    """What a JSON upload holds (SHC, FHIR_JSON, "other-json" for another object, "not-json"
    for anything else) and the stream to encrypt: the upload itself when it is UTF-8 JSON
    already, else a UTF-8 rewrite of it (a byte order mark, UTF-16 or UTF-32)."""
    size = stream.seek(0, io.SEEK_END)
    stream.seek(0)
    if size > JSON_IN_MEMORY:
        kind = _json_kind_streamed(stream)
        stream.seek(0)
        if kind is not None:
            return kind, stream
    data = stream.read()
    stream.seek(0)
    try:
        return _kind_of(orjson.loads(data)), stream
    except orjson.JSONDecodeError:
        pass
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return "not-json", stream
    return _kind_of(obj), io.BytesIO(_dumps(obj))


def _kind_of(obj: Any) -> str:
    if not isinstance(obj, dict):
        return "not-json"
    if isinstance(obj.get("verifiableCredential"), list):
        return SHC
    if isinstance(obj.get("resourceType"), str):
        return FHIR_JSON
    return "other-json"


def _json_kind_streamed(stream: IO[bytes]) -> str | None:
    """``_json_kind`` for a large file, parsed as a stream (None: let the in-memory path judge)."""
    import ijson

    top: dict[str, Any] = {}
    try:
        for prefix, event, value in ijson.parse(stream, buf_size=IJSON_BUFFER):
            if prefix == "resourceType" and event == "string":
                top["resourceType"] = value
            elif prefix == "verifiableCredential" and event == "start_array":
                top["verifiableCredential"] = []
            elif prefix == "" and event not in ("start_map", "end_map", "map_key"):
                top.clear()
                top["not an object"] = True
    except (ijson.JSONError, ijson.IncompleteJSONError, UnicodeDecodeError, ValueError):
        return None
    return "not-json" if "not an object" in top else _kind_of(top)


def _has_two_lines(stream: IO[bytes]) -> bool:
    stream.seek(0)
    lines = 0
    for line in stream:
        lines += bool(line.strip())
        if lines > 1:
            break
    stream.seek(0)
    return lines > 1


def _ndjson_file(stream: IO[bytes], filename: str) -> PreparedFile:
    with BundleWriter() as bundle:
        for _number, resource, problems in iter_ndjson(stream, source=filename):
            bundle.problems.extend(problems)
            if resource is not None:
                bundle.add(resource)
        return bundle.finish()


def _sphr_file(stream: IO[bytes], password: str | None, max_size: int) -> PreparedFile:
    sphr = open_sphr(stream, password, max_size)
    try:
        base = posixpath.dirname(sphr.phr_names[0])
        members = set(sphr.attachment_names)
        with BundleWriter(sphr) as bundle:
            for name in sphr.phr_names:
                for _number, resource, problems in iter_ndjson(sphr.lines(name), source=name):
                    bundle.problems.extend(problems)
                    if resource is None:
                        continue
                    for attachment in attachments_of(resource):
                        url = attachment.get("url")
                        if isinstance(url, str) and "://" not in url and not url.startswith(("urn:", "#")):
                            member = posixpath.normpath(posixpath.join(base, url))
                            if member in members:
                                attachment.pop("url")
                                attachment[_MEMBER] = member
                    bundle.add(resource)
            if bundle.count:
                for name in sphr.attachment_names:
                    if name not in bundle.inlined:
                        bundle.add({"resourceType": "Binary", "contentType": guess_type(name), _MEMBER: name})
            return bundle.finish()
    finally:
        sphr.close()


_MEMBER = "\x00member"  # marks where an archive member's bytes go; never valid FHIR


class BundleWriter:
    """Writes a FHIR R4 collection Bundle to a spooled temporary file one resource at a
    time, dropping exact repeats (differing resources that share an id are both kept).

    An attachment (or Binary) holding ``_MEMBER: <archive member>`` gets that member's
    bytes as base64 ``data``, streamed from the archive, plus ``contentType`` and ``size``.
    """

    def __init__(self, archive: SphrArchive | None = None) -> None:
        self.archive = archive
        self.out: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)  # noqa: SIM115 - handed on
        self.problems: list[Problem] = []
        self.inlined: set[str] = set()
        self.count = 0
        self._seen: set[bytes] = set()
        self._nonce = secrets.token_hex(16)
        timestamp = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        self.out.write(b'{"resourceType":"Bundle","type":"collection","timestamp":"%s","entry":['
                       % timestamp.encode())

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, kind: Any, *_rest: Any) -> None:
        if kind is not None:
            self.out.close()

    def add(self, resource: dict[str, Any]) -> None:
        members: list[str] = []
        holders = [resource] if _MEMBER in resource else list(attachments_of(resource))
        for holder in holders:
            member = holder.pop(_MEMBER, None)
            if isinstance(member, str) and self.archive is not None:
                holder["data"] = f"{self._nonce}:{len(members)}"
                holder.setdefault("contentType", guess_type(member))
                if holder is not resource:
                    holder.setdefault("size", self.archive.size(member))
                members.append(member)
        canonical = orjson.dumps(resource, option=orjson.OPT_SORT_KEYS) + "\0".join(members).encode()
        digest = hashlib.blake2b(canonical, digest_size=16).digest()
        if digest in self._seen:
            return
        self._seen.add(digest)
        text = orjson.dumps(resource)
        self.out.write(b',{"resource":' if self.count else b'{"resource":')
        self.count += 1
        if not members:
            self.out.write(text)
        else:
            pieces = re.split(b'"%s:(\\d+)"' % self._nonce.encode(), text)
            for index, piece in enumerate(pieces):
                if index % 2 == 0:
                    self.out.write(piece)
                else:
                    self._write_member(members[int(piece)])
        self.out.write(b"}")

    def _write_member(self, name: str) -> None:
        """``"<base64 of the member>"``, a piece at a time."""
        assert self.archive is not None
        self.inlined.add(name)
        self.out.write(b'"')
        carry = b""
        for chunk in self.archive.chunks(name, BASE64_STEP):
            data = carry + chunk
            whole = len(data) - len(data) % 3
            self.out.write(pybase64.b64encode(data[:whole]))
            carry = data[whole:]
        self.out.write(pybase64.b64encode(carry) + b'"')

    def finish(self) -> PreparedFile:
        """The Bundle, ready to encrypt; refuses a record without one readable resource."""
        if not self.count:
            self.out.close()
            first = self.problems[0].message if self.problems else "no resources"
            raise BadRequest(f"the record holds no readable FHIR resources ({first})", code="invalid_content")
        self.out.write(b"]}")
        self.out.seek(0)
        return PreparedFile(FHIR_JSON, self.out, self.problems)
