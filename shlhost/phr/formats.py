"""Record formats: NDJSON / .phr, FHIR Bundles, .sphr archives and SMART Health Card files.

Readers are lenient the way the PHR guide's real-world files need: a broken line, a string
``_id`` or a duplicate is reported as a ``Problem`` naming the line, never fatal on its own.
"""

from __future__ import annotations

import base64
import io
import json
import posixpath
import struct
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

import orjson
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


@dataclass
class Attachment:
    name: str  # path inside the archive
    data: bytes
    content_type: str


@dataclass
class Record:
    """What a file held: resources in order, the attachments beside them, and the problems."""

    resources: list[dict[str, Any]] = field(default_factory=list)
    attachments: dict[str, Attachment] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)


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


class LineTooLong(Exception):
    pass


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


def read_ndjson(data: bytes, source: str | None = None) -> Record:
    record = Record()
    for _n, resource, problems in iter_ndjson(io.BytesIO(data), source):
        record.problems.extend(problems)
        if resource is not None:
            record.resources.append(resource)
    return record


def read_bundle(obj: dict[str, Any], source: str | None = None) -> Record:
    record = Record()
    for index, entry in enumerate(obj.get("entry") or [], start=1):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if resource is None:
            record.problems.append(Problem(f"Bundle entry {index} has no resource", source=source))
            continue
        cleaned, problems = clean_resource(resource, None, source)
        record.problems.extend(problems)
        if cleaned is not None:
            record.resources.append(cleaned)
    return record


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


@dataclass
class SphrArchive:
    """A checked .sphr: its .phr members and its attachments (junk left out)."""

    archive: Any
    phr_names: list[str]
    attachment_names: list[str]

    def read(self, name: str) -> bytes:
        try:
            data: bytes = self.archive.read(name)
            return data
        except RuntimeError as exc:  # pyzipper: "Bad password for file ..."
            if "password" in str(exc).lower():
                raise BadRequest("wrong password for this .sphr", code="sphr_wrong_password") from None
            raise BadRequest("the .sphr could not be read", code="invalid_sphr") from None
        except DAMAGED:
            # Checksum or authentication failures of a tampered archive land here.
            raise BadRequest("the .sphr is damaged or has been tampered with", code="invalid_sphr") from None

    def lines(self, name: str) -> Iterator[bytes]:
        """A .phr member line by line, without inflating it whole."""
        try:
            with self.archive.open(name) as member:
                yield from io.BufferedReader(member, 1 << 16)  # type: ignore[arg-type]
        except RuntimeError as exc:
            if "password" in str(exc).lower():
                raise BadRequest("wrong password for this .sphr", code="sphr_wrong_password") from None
            raise BadRequest("the .sphr could not be read", code="invalid_sphr") from None
        except DAMAGED:
            raise BadRequest("the .sphr is damaged or has been tampered with", code="invalid_sphr") from None

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


def read_sphr(data: bytes, password: str | None, max_size: int) -> Record:
    """Read a whole .sphr into memory (for link uploads; the importer streams instead)."""
    sphr = open_sphr(io.BytesIO(data), password, max_size)
    try:
        record = Record()
        for name in sphr.phr_names:
            sub = read_ndjson(sphr.read(name), source=name)
            record.resources.extend(sub.resources)
            record.problems.extend(sub.problems)
        for name in sphr.attachment_names:
            record.attachments[name] = Attachment(name, sphr.read(name), guess_type(name))
        _link_attachments(record, sphr.phr_names)
        return record
    finally:
        sphr.close()


def _link_attachments(record: Record, phr_names: list[str]) -> None:
    """Point Media/DocumentReference/Binary attachments with relative URLs at archive members."""
    base = posixpath.dirname(phr_names[0])
    for resource in record.resources:
        for attachment in attachments_of(resource):
            url = attachment.get("url")
            if not isinstance(url, str) or "://" in url or url.startswith(("urn:", "#")):
                continue
            member = posixpath.normpath(posixpath.join(base, url))
            if member in record.attachments:
                attachment["_archiveMember"] = member


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


def inline_attachments(record: Record) -> None:
    """Embed referenced archive members as base64 ``data`` so a Bundle stands alone."""
    used: set[str] = set()
    for resource in record.resources:
        for attachment in attachments_of(resource):
            member = attachment.pop("_archiveMember", None)
            if member:
                att = record.attachments[member]
                attachment["data"] = base64.b64encode(att.data).decode("ascii")
                attachment.setdefault("contentType", att.content_type)
                attachment.setdefault("size", len(att.data))
                attachment.pop("url", None)
                used.add(member)
    for name, att in record.attachments.items():
        if name not in used:
            record.resources.append(
                {
                    "resourceType": "Binary",
                    "contentType": att.content_type,
                    "data": base64.b64encode(att.data).decode("ascii"),
                }
            )


def dedupe(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop exact repeats; differing resources that share an id are both kept."""
    seen: set[bytes] = set()
    out = []
    for resource in resources:
        digest = json.dumps(resource, sort_keys=True, separators=(",", ":")).encode()
        if digest in seen:
            continue
        seen.add(digest)
        out.append(resource)
    return out


def record_to_bundle(record: Record) -> dict[str, Any]:
    """A FHIR R4 collection Bundle that any conformant viewer can read."""
    inline_attachments(record)
    resources = dedupe(record.resources)
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "entry": [{"resource": r} for r in resources],
    }


@dataclass
class PreparedFile:
    """A file ready to encrypt: its SHL content type and its plaintext bytes."""

    content_type: str
    body: bytes
    problems: list[Problem] = field(default_factory=list)


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
    return PreparedFile(content_type, _dumps(content))


def prepare_upload(filename: str, data: bytes, *, password: str | None = None, max_size: int) -> PreparedFile:
    """Turn an uploaded file into something every SHL viewer can read.

    A Bundle or resource stays as it is; a SMART Health Card file stays a card;
    NDJSON, .phr and .sphr become one collection Bundle.
    """
    name = (filename or "").lower()
    if not data.strip():
        raise BadRequest(f"the file {filename or '(unnamed)'} is empty", code="empty_file")
    if name.endswith(ZIP_SUFFIXES) or data.startswith(ZIP_MAGIC):
        record = read_sphr(data, password, max_size)
        return _record_file(record)
    if name.endswith(NDJSON_SUFFIXES):
        return _record_file(read_ndjson(data, source=filename))
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        obj = None
    if isinstance(obj, dict):
        if isinstance(obj.get("verifiableCredential"), list):
            return PreparedFile(SHC, _dumps(obj))
        if name.endswith(".smart-health-card"):
            raise BadRequest("a .smart-health-card file must hold a verifiableCredential list", code="invalid_content")
        if isinstance(obj.get("resourceType"), str):
            return PreparedFile(FHIR_JSON, _dumps(obj))
        raise UnsupportedMediaType(
            f"{filename or 'the file'} is JSON but neither a FHIR resource nor a SMART Health Card",
            code="unknown_content_type",
        )
    if obj is None and data.lstrip()[:1] == b"{" and b"\n" in data.strip():
        return _record_file(read_ndjson(data, source=filename))
    raise UnsupportedMediaType(
        f"{filename or 'the file'} is not a FHIR Bundle, NDJSON/.phr, .sphr or SMART Health Card file",
        code="unknown_content_type",
    )


def _record_file(record: Record) -> PreparedFile:
    if not record.resources:
        first = record.problems[0].message if record.problems else "no resources"
        raise BadRequest(f"the record holds no readable FHIR resources ({first})", code="invalid_content")
    bundle = record_to_bundle(record)
    return PreparedFile(FHIR_JSON, _dumps(bundle), record.problems)
