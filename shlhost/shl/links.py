"""The links service: create, resolve and manage SMART Health Links.

Takes a SQLAlchemy ``Session`` and a ``BlobStore``; knows nothing of Flask. Every counter
the protocol depends on (uses, the passcode budget) changes in one conditional
``UPDATE ... RETURNING`` that re-checks liveness, committed before the answer goes out.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import json
import threading
from collections import namedtuple
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any, TypeVar

from argon2 import PasswordHasher
from sqlalchemy import Connection, Engine, bindparam, select, update
from sqlalchemy.orm import Session

from shlhost.crypto import jwe
from shlhost.crypto.b64 import b64url_encode
from shlhost.crypto.keys import new_link_key, new_token, token_hash, unwrap_key, wrap_key
from shlhost.crypto.passcodes import hash_secret, verify_secret
from shlhost.errors import (
    BadRequest,
    Conflict,
    DeadLink,
    NotFound,
    UnsupportedMediaType,
    WrongPasscode,
)
from shlhost.phr.formats import SHL_CONTENT_TYPES, PreparedFile
from shlhost.shl import payload as shl_payload
from shlhost.shl import tickets
from shlhost.shl.uses import DEAD, LOG_ACCESS, OK, UseRecorder, access_row
from shlhost.storage.blobs import BlobStore
from shlhost.storage.models import Access, Link, LinkFile, link_status
from shlhost.storage.rawsql import RawStatement, RawTransaction


class KeyUnavailable(Conflict):
    def __init__(self) -> None:
        super().__init__(
            "this server cannot open the link's key: KEY_ENCRYPTION_KEY differs from the one "
            "it was created under",
            code="key_unavailable",
        )


PASSCODE_MAX = 200


@dataclass(frozen=True)
class LinkSettings:
    kek: bytes
    ticket_secret: bytes
    public_url: str
    ticket_lifetime: int
    passcode_attempts: int
    hasher: PasswordHasher

    # The largest JWE embedded in a manifest whatever embeddedLengthMax says (EMBED_MAX_BYTES).
    embed_max: int = 4 * 1024 * 1024
    @property
    def viewer_url(self) -> str:
        return self.public_url + "/view"

    def link_url(self, link_id: str) -> str:
        return f"{self.public_url}/shl/{link_id}"

    def file_url(self, link_id: str, file_id: str, ticket: str) -> str:
        return f"{self.public_url}/shl/{link_id}/files/{file_id}?ticket={ticket}"


@dataclass(frozen=True)
class EncryptedFile:
    """A file the client encrypted itself: the server never sees its key. The compact JWE
    comes as a string (a JSON request) or as a seekable binary stream (an uploaded file)."""

    content_type: str
    jwe: str | IO[bytes]

    def close(self) -> None:
        if not isinstance(self.jwe, str):
            self.jwe.close()


NewFile = PreparedFile | EncryptedFile

_Method = TypeVar("_Method", bound=Callable[..., Any])
_Blob = TypeVar("_Blob")


def _closes_files(method: _Method) -> _Method:
    """The service owns the files it is given (often spooled temporary files): they are
    closed when the call returns or raises."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        finally:
            for arg in args:
                for item in arg if isinstance(arg, (list, tuple)) else [arg]:
                    if isinstance(item, (PreparedFile, EncryptedFile)):
                        item.close()

    return wrapper  # type: ignore[return-value]


@dataclass
class LinkOptions:
    label: str | None = None
    passcode: str | None = None
    exp: datetime | None = None
    flags: str = ""  # L and/or U as asked; P follows from the passcode
    max_uses: int | None = None


@dataclass
class Created:
    link: Link
    management_token: str
    key: bytes | None  # None when the client holds the key


# ---------------------------------------------------------------------------------------
# Input checks shared by creation and PATCH


def parse_exp(value: Any, now: datetime) -> datetime | None:
    """Epoch seconds or ISO 8601, in the future; None stays None."""
    if value is None or value == "":
        return None
    when: datetime
    if isinstance(value, bool):
        raise BadRequest("exp must be epoch seconds or an ISO 8601 time", code="invalid_exp")
    if isinstance(value, (int, float)) or (
        isinstance(value, str) and value.strip().lstrip("-").isdigit()
    ):
        try:
            when = datetime.fromtimestamp(float(value), UTC)
        except (OverflowError, OSError, ValueError):
            raise BadRequest("exp is out of range", code="invalid_exp") from None
    elif isinstance(value, str):
        try:
            when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise BadRequest(
                "exp must be epoch seconds or an ISO 8601 time", code="invalid_exp"
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
    else:
        raise BadRequest("exp must be epoch seconds or an ISO 8601 time", code="invalid_exp")
    if when <= now:
        raise BadRequest("exp must be in the future", code="invalid_exp")
    return when.astimezone(UTC).replace(microsecond=0)


def check_recipient(recipient: Any) -> None:
    if not isinstance(recipient, str) or not recipient.strip():
        raise BadRequest("recipient is required: say who is asking", code="recipient_required")
    if "\x00" in recipient:
        raise BadRequest("recipient must not contain NUL characters", code="invalid_recipient")


def check_label(label: Any) -> str | None:
    if label is None or label == "":
        return None
    if not isinstance(label, str) or "\x00" in label:
        raise BadRequest("label must be a string without NUL characters", code="invalid_label")
    if len(label) > shl_payload.LABEL_MAX:
        raise BadRequest(
            f"label must be at most {shl_payload.LABEL_MAX} characters", code="invalid_label"
        )
    return label


def check_passcode(passcode: Any) -> str | None:
    if passcode is None or passcode == "":
        return None
    if not isinstance(passcode, str):
        raise BadRequest("passcode must be a string", code="invalid_passcode")
    if len(passcode) > PASSCODE_MAX:
        raise BadRequest(
            f"passcode must be at most {PASSCODE_MAX} characters", code="invalid_passcode"
        )
    return passcode


def check_max_uses(value: Any) -> int | None:
    if value is None or value == "":
        return None
    try:
        uses = int(value)
    except (TypeError, ValueError):
        raise BadRequest("max_uses must be a whole number", code="invalid_max_uses") from None
    if isinstance(value, bool) or isinstance(value, float) and value != uses or uses < 1:
        raise BadRequest("max_uses must be a whole number of at least 1", code="invalid_max_uses")
    return uses


def _epoch(when: datetime | None) -> int | None:
    return int(when.timestamp()) if when else None


def _iso(when: datetime | None) -> str | None:
    return when.isoformat(timespec="seconds").replace("+00:00", "Z") if when else None


LiveLink = namedtuple("LiveLink", ("long_term", "files", "version", "exp"))


class LiveLinkCache:
    """What this process last read of links that are served often and need nothing but
    their files: no passcode (argon2 dwarfs a read), no use limit (a used-up link must
    read as such), not U (a U link has no manifest). A manifest request for such a link
    counts its use with the ``updated_at`` it read (``UseRecorder.record``'s ``version``):
    if the link or its files have changed since (every change moves ``updated_at``; a
    pause, a revocation, a new file), nothing is counted and the request reads the link
    again; expiry is checked before. So the answer is what a fresh read would have given,
    without the read. Bounded: the oldest entry goes first."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._entries: dict[str, LiveLink] = {}
        self._lock = threading.Lock()  # for put and forget; get reads without it

    @staticmethod
    def keeps(link: Any) -> bool:
        return link.passcode_hash is None and link.max_uses is None and not link.direct

    def get(self, link_id: str) -> LiveLink | None:
        return self._entries.get(link_id)

    def put(self, link_id: str, entry: LiveLink) -> None:
        with self._lock:
            if link_id not in self._entries and len(self._entries) >= self.size:
                del self._entries[next(iter(self._entries))]
            self._entries[link_id] = entry

    def forget(self, link_id: str) -> None:
        with self._lock:
            self._entries.pop(link_id, None)


class LinkService:
    def __init__(
        self,
        session: Session | Callable[[], Session],
        blobs: BlobStore,
        settings: LinkSettings,
        uses: UseRecorder | None = None,
        cache: LiveLinkCache | None = None,
    ) -> None:
        # A session, or how to get one: the data plane's requests mostly never need one.
        self._session = session if isinstance(session, Session) else None
        self._get_session = None if isinstance(session, Session) else session
        self.blobs = blobs
        self.settings = settings
        # The process's shared recorder batches the uses of concurrent requests; without
        # one, each use is its own transaction.
        self._uses = uses
        self._cache = cache

    @property
    def session(self) -> Session:
        if self._session is None:
            assert self._get_session is not None
            self._session = self._get_session()
        return self._session

    @property
    def uses(self) -> UseRecorder:
        if self._uses is None:
            bind = self.session.get_bind()
            assert isinstance(bind, Engine), "a LinkService's session is bound to an engine"
            self._uses = UseRecorder(bind)
        return self._uses

    # -- creation ------------------------------------------------------------------------

    @_closes_files
    def create(
        self,
        files: Sequence[NewFile],
        options: LinkOptions,
        *,
        now: datetime,
        account_id: int | None = None,
        record_query: str | None = None,
    ) -> Created:
        if not files:
            raise BadRequest("a link needs at least one file", code="no_files")
        flag_letters = options.flags.upper()
        if "P" in flag_letters:
            raise BadRequest(
                "flag P follows from giving a passcode; do not send it", code="invalid_flags"
            )
        passcode = check_passcode(options.passcode)
        flag = shl_payload.normalise_flags(flag_letters + ("P" if passcode else ""))
        if "U" in flag and len(files) != 1:
            raise BadRequest("a U link carries exactly one file", code="invalid_flags")
        pre_encrypted = [isinstance(f, EncryptedFile) for f in files]
        if any(pre_encrypted) and not all(pre_encrypted):
            raise BadRequest(
                "send either pre-encrypted JWE files or plain content, not both", code="mixed_files"
            )
        label = check_label(options.label)
        exp = options.exp
        if exp is not None and exp <= now:
            raise BadRequest("exp must be in the future", code="invalid_exp")

        link_id = new_token(32)
        token = new_token(32)
        key = None if all(pre_encrypted) else new_link_key()
        link = Link(
            id=link_id,
            account_id=account_id,
            management_token_hash=token_hash(token),
            wrapped_key=wrap_key(self.settings.kek, key, link_id) if key else None,
            server_keyed=key is not None,
            label=label,
            long_term="L" in flag,
            direct="U" in flag,
            passcode_hash=hash_secret(self.settings.hasher, passcode) if passcode else None,
            attempts_left=self.settings.passcode_attempts if passcode else None,
            exp=exp,
            active=True,
            max_uses=check_max_uses(options.max_uses),
            uses=0,
            created_at=now,
            updated_at=now,
            record_query=record_query,
        )
        written: list[str] = []
        # The caller may have read already (an API token's account): end that transaction
        # before writing blobs, which the database blob store does through a connection of
        # its own (on SQLite it would wait for this session's lock). See add_files.
        self.session.commit()
        try:
            for position, new in enumerate(files):
                link.files.append(self._store_file(link_id, key, new, position, now, written))
            self.session.add(link)
            self.session.commit()
        except BaseException:
            self.session.rollback()
            self._delete_blobs(written)
            raise
        return Created(link, token, key)

    def _store_file(
        self,
        link_id: str,
        key: bytes | None,
        new: NewFile,
        position: int,
        now: datetime,
        written: list[str],
        file_id: str | None = None,
    ) -> LinkFile:
        self._check_file(key, new)
        file_id = file_id or new_token(16)
        blob_key = f"links/{link_id}/{file_id}-{new_token(6)}.jwe"
        # Encrypted (or checked) straight into the blob store, a chunk at a time.
        with self.blobs.writer(blob_key) as out:
            size = self._write_jwe(key, new, out)
        written.append(blob_key)
        return LinkFile(
            id=file_id,
            link_id=link_id,
            position=position,
            content_type=new.content_type,
            blob_key=blob_key,
            jwe_size=size,
            last_updated=now,
            created_at=now,
        )

    @staticmethod
    def _check_file(key: bytes | None, new: NewFile) -> None:
        if new.content_type not in SHL_CONTENT_TYPES:
            raise UnsupportedMediaType(
                f"contentType must be one of {', '.join(SHL_CONTENT_TYPES)}",
                code="unknown_content_type",
            )
        if isinstance(new, EncryptedFile):
            if key is not None:
                raise BadRequest(
                    "this link's key is held by the server: send content, not a JWE",
                    code="mixed_files",
                )
            if isinstance(new.jwe, str):
                jwe.parse(new.jwe, expected_cty=new.content_type)
        elif key is None:
            raise BadRequest(
                "this link's files are encrypted by the client: send a JWE", code="mixed_files"
            )

    @staticmethod
    def _write_jwe(key: bytes | None, new: NewFile, out: IO[bytes]) -> int:
        """Write the file's compact JWE to ``out``; return its length."""
        if isinstance(new, PreparedFile):
            assert key is not None  # _check_file
            return jwe.encrypt_stream(new.source, out, key, new.content_type)
        if isinstance(new.jwe, str):
            return out.write(new.jwe.strip().encode("ascii"))
        parsed = jwe.check_stream(new.jwe, expected_cty=new.content_type)
        return jwe.copy_token(new.jwe, parsed, out)

    def _delete_blobs(self, keys: Iterable[str]) -> None:
        for key in keys:
            with contextlib.suppress(OSError):
                self.blobs.delete(key)

    # -- the data plane ------------------------------------------------------------------
    # The hot path: prebuilt Core statements (see the bottom of this module), one
    # transaction for a link without passcode, no ORM objects.

    # ``tx``: the manifest runs on a RawTransaction of its own (no Session bookkeeping);
    # without one, these run in the session's transaction.

    def _transaction(self) -> RawTransaction | None:
        """A RawTransaction on the session's engine, unless the session is already busy."""
        if self._session is None and self._uses is not None:
            return RawTransaction(self._uses.engine)  # no session yet, so none is busy
        bind = self.session.get_bind()
        if isinstance(bind, Engine) and not self.session.in_transaction():
            return RawTransaction(bind)
        return None

    def _conn(self, tx: RawTransaction | None) -> Connection | RawTransaction:
        return self.session.connection() if tx is None else tx

    def _commit(self, tx: RawTransaction | None) -> None:
        if tx is None:
            self.session.commit()
        else:
            tx.commit()

    def _rollback(self, tx: RawTransaction | None) -> None:
        if tx is None:
            self.session.rollback()
        else:
            tx.rollback()

    def _log(
        self,
        link_id: str,
        now: datetime,
        recipient: str | None,
        action: str,
        outcome: str,
        file_id: str | None = None,
        tx: RawTransaction | None = None,
    ) -> None:
        LOG_ACCESS.run(
            self._conn(tx), access_row(link_id, now, recipient, action, outcome, file_id)
        )

    def _dead(
        self,
        link_id: str,
        now: datetime,
        recipient: str | None,
        action: str,
        outcome: str,
        tx: RawTransaction | None = None,
    ) -> DeadLink:
        self._log(link_id, now, recipient, action, outcome, tx=tx)
        self._commit(tx)
        return DeadLink()

    def _spend_use(
        self,
        link_id: str,
        now: datetime,
        recipient: str | None,
        action: str,
        version: datetime | None = None,
    ) -> bool:
        """Count one use and log the access, committed with the other requests' that arrive
        meanwhile; the uniform dead link if the link stopped being live since it was read
        (logged as such). False, with nothing written, if ``version`` is given and the link
        has changed since. No transaction may be open: the recorder writes on its own."""
        outcome = self.uses.record(link_id, now, recipient, action, version)
        if outcome == DEAD:
            raise DeadLink()
        return outcome == OK

    def _spend_attempt(
        self, link_id: str, now: datetime, tx: RawTransaction | None = None
    ) -> int | None:
        """Take one attempt from the passcode budget; the attempts left, or None if none were."""
        row = _SPEND_ATTEMPT.first(self._conn(tx), {"link_id": link_id, "now": now})
        return None if row is None else int(row.attempts_left)

    def _live_link(
        self,
        link_id: str,
        now: datetime,
        recipient: str | None,
        action: str,
        tx: RawTransaction | None = None,
    ) -> tuple[Any, list[Any]]:
        """The link's row and its files' rows, if it is live; else the uniform dead link."""
        if not (isinstance(link_id, str) and len(link_id) == 43):
            raise DeadLink()  # no query, so no transaction to end
        rows = _LOAD_LINK.all(self._conn(tx), {"link_id": link_id})
        if not rows:
            self._rollback(tx)
            raise DeadLink()
        link = rows[0]
        status = link_status(link, now)
        if status != "active":
            raise self._dead(link_id, now, recipient, action, status, tx)
        files = [
            FileRow(r.file_id, r.file_content_type, r.file_blob_key, r.file_jwe_size,
                    r.file_last_updated)
            for r in rows
            if r.file_id is not None
        ]
        return link, files

    def manifest(
        self, link_id: str, *, recipient: Any, passcode: Any, embedded_max: Any, now: datetime
    ) -> dict[str, Any]:
        check_recipient(recipient)
        if embedded_max is not None and (
            isinstance(embedded_max, bool) or not isinstance(embedded_max, int) or embedded_max < 0
        ):
            raise BadRequest(
                "embeddedLengthMax must be a whole number", code="invalid_embedded_length_max"
            )
        if passcode is not None and not isinstance(passcode, str):
            raise BadRequest("passcode must be a string", code="invalid_passcode")
        answer = self._manifest_as_seen(link_id, recipient, embedded_max, now)
        if answer is not None:
            return answer
        tx = self._transaction()
        try:
            link, files = self._live_link(link_id, now, recipient, "manifest", tx)
            if link.direct:
                self._rollback(tx)
                raise BadRequest(
                    "this is a U link: GET the url with a recipient", code="direct_link"
                )
            # End the read transaction (before argon2, before the recorder's own).
            self._commit(tx)
            if link.passcode_hash is not None:
                if not passcode:
                    # No guess was made; the budget is untouched.
                    raise WrongPasscode(int(link.attempts_left or 0))
                if len(passcode) > PASSCODE_MAX or not verify_secret(
                    self.settings.hasher, link.passcode_hash, passcode
                ):
                    left = self._spend_attempt(link_id, now, tx)
                    outcome = "wrong_passcode" if left is not None else "locked"
                    self._log(link_id, now, recipient, "manifest", outcome, tx=tx)
                    self._commit(tx)
                    if left is None:
                        raise DeadLink()
                    raise WrongPasscode(left)
        finally:
            if tx is not None:
                tx.close()  # rolls back whatever an error left open
        if self._cache is not None and LiveLinkCache.keeps(link):
            seen = LiveLink(bool(link.long_term), files, link.updated_at, link.exp)
            self._cache.put(link_id, seen)
        self._spend_use(link_id, now, recipient, "manifest")
        return self._manifest_body(link_id, bool(link.long_term), files, embedded_max, now)

    def _manifest_as_seen(
        self, link_id: str, recipient: str | None, embedded_max: int | None, now: datetime
    ) -> dict[str, Any] | None:
        """The manifest from what this process read of the link before, if the link has
        not changed since (the use is counted only then); None: read the link."""
        seen = self._cache.get(link_id) if self._cache is not None else None
        if seen is None:
            return None
        assert self._cache is not None
        try:
            if (seen.exp is None or seen.exp > now) and self._spend_use(
                link_id, now, recipient, "manifest", seen.version
            ):
                return self._manifest_body(link_id, seen.long_term, seen.files, embedded_max, now)
        except DeadLink:
            self._cache.forget(link_id)
            raise
        self._cache.forget(link_id)  # changed, or expired
        return None

    def _manifest_body(
        self,
        link_id: str,
        long_term: bool,
        files: list[Any],
        embedded_max: int | None,
        now: datetime,
    ) -> dict[str, Any]:
        entries: list[dict[str, Any]] = []
        for f in files:
            if f.blob_key is None:
                continue
            entry: dict[str, Any] = {
                "contentType": f.content_type,
                "lastUpdated": _iso(f.last_updated),
            }
            cap = None if embedded_max is None else min(embedded_max, self.settings.embed_max)
            if cap is not None and f.jwe_size <= cap:
                entry["embedded"] = self._read_file(f.id, f.blob_key)
            else:
                ticket = tickets.issue(
                    self.settings.ticket_secret,
                    link_id,
                    f.id,
                    now.timestamp(),
                    self.settings.ticket_lifetime,
                )
                entry["location"] = self.settings.file_url(link_id, f.id, ticket)
            entries.append(entry)
        return {"status": "can-change" if long_term else "finalized", "files": entries}

    def _read_file(self, file_id: str, blob_key: str | None) -> str:
        """A (small) file's JWE, for embedding in a manifest (cached by the blob store)."""
        return self._blob(file_id, blob_key, self.blobs.get).decode("ascii")

    def _open_file(self, file_id: str, blob_key: str | None) -> IO[bytes]:
        """A file's JWE as a stream. Once open, a local or S3 blob reads whole even if it is
        deleted meanwhile."""
        return self._blob(file_id, blob_key, self.blobs.open)

    def _blob(self, file_id: str, blob_key: str | None, read: Callable[[str], _Blob]) -> _Blob:
        """``read`` of a file's blob. An L link's file may be replaced between reading its
        row and its blob (the old blob is deleted once the new one is in): then read the row
        again."""
        for _attempt in range(3):
            if blob_key is None:
                break
            try:
                return read(blob_key)
            except KeyError:
                blob_key = (
                    self.session.connection().execute(_BLOB_KEY, {"file_id": file_id}).scalar()
                )
                self.session.rollback()
        raise DeadLink()  # revoked meanwhile

    def direct(self, link_id: str, *, recipient: Any, now: datetime) -> IO[bytes]:
        """The one file of a U link, as a stream of its JWE (the caller closes it)."""
        check_recipient(recipient)
        link, files = self._live_link(link_id, now, recipient, "direct")
        if not link.direct:
            self.session.rollback()
            raise BadRequest("this link has a manifest: POST to it", code="manifest_link")
        self.session.rollback()  # end the read transaction before the recorder's
        self._spend_use(link_id, now, recipient, "direct")
        current = next((f for f in files if f.blob_key), None)
        if current is None:
            raise DeadLink()
        return self._open_file(current.id, current.blob_key)

    def fetch_file(self, link_id: str, file_id: str, ticket: Any, *, now: datetime) -> IO[bytes]:
        """A file named in a manifest's ``location``, good while its ticket is: a stream of
        its JWE (the caller closes it)."""
        if not tickets.check(
            self.settings.ticket_secret, ticket, link_id, file_id, now.timestamp()
        ):
            raise DeadLink()
        blob_key = (
            self.session.connection()
            .execute(_SERVABLE_FILE, {"link_id": link_id, "file_id": file_id, "now": now})
            .scalar()
        )
        if blob_key is None:
            self.session.rollback()
            raise DeadLink()
        self._log(link_id, now, None, "file", "ok", file_id)
        self.session.commit()
        return self._open_file(file_id, blob_key)

    # -- management ----------------------------------------------------------------------

    def owned(self, link_id: str, token: str | None, *, account_id: int | None = None) -> Link:
        """The link if ``token`` is its management token (or it belongs to ``account_id``)."""
        link = (
            self.session.get(Link, link_id)
            if isinstance(link_id, str) and len(link_id) <= 64
            else None
        )
        stored = link.management_token_hash if link else "0" * 64
        # Compare even when there is no such link, so timing says nothing about existence.
        good = hmac.compare_digest(token_hash(token or ""), stored) and bool(token)
        if link is None or not (good or (account_id is not None and link.account_id == account_id)):
            raise NotFound("No such link, or the management token is wrong.")
        return link

    def link_key(self, link: Link) -> bytes | None:
        if link.wrapped_key is None:
            return None
        try:
            return unwrap_key(self.settings.kek, link.wrapped_key, link.id)
        except ValueError:
            raise KeyUnavailable() from None

    def shlink(self, link: Link, *, viewer: bool = False) -> str | None:
        """The full link, when the server holds the key and the link is not revoked."""
        key = self.link_key(link)
        if key is None:
            return None
        data = shl_payload.Payload(
            url=self.settings.link_url(link.id),
            key=b64url_encode(key),
            exp=_epoch(link.exp),
            flag=link.flag,
            label=link.label,
        )
        return shl_payload.encode(data, self.settings.viewer_url if viewer else None)

    def describe(self, link: Link, now: datetime) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": link.id,
            "url": self.settings.link_url(link.id),
            "flag": link.flag,
            "label": link.label,
            "exp": _epoch(link.exp),
            "status": link.status(now),
            "active": link.active,
            "long_term": link.long_term,
            "passcode": link.passcode_hash is not None,
            "attempts_left": link.attempts_left,
            "max_uses": link.max_uses,
            "uses": link.uses,
            "uses_left": None if link.max_uses is None else max(0, link.max_uses - link.uses),
            "server_keyed": link.server_keyed,
            "from_record": json.loads(link.record_query) if link.record_query else None,
            "created_at": _iso(link.created_at),
            "revoked_at": _iso(link.revoked_at),
            "files": [
                {
                    "id": f.id,
                    "contentType": f.content_type,
                    "lastUpdated": _iso(f.last_updated),
                    "size": f.jwe_size,
                    "purged": f.blob_key is None,
                }
                for f in link.files
            ],
        }
        try:
            shlink = self.shlink(link)
        except KeyUnavailable:
            shlink = None
            out["key_unavailable"] = True
        if shlink:
            out["shlink"] = shlink
            out["viewer_url"] = f"{self.settings.viewer_url}#{shlink}"
        return out

    def update(self, link: Link, changes: dict[str, Any], *, now: datetime) -> Link:
        allowed = {"active", "exp", "label", "passcode", "max_uses"}
        unknown = set(changes) - allowed
        if unknown:
            raise BadRequest(f"cannot change {', '.join(sorted(unknown))}", code="unknown_field")
        if link.revoked_at is not None:
            raise Conflict("the link is revoked", code="revoked")
        if "active" in changes:
            if not isinstance(changes["active"], bool):
                raise BadRequest("active must be true or false", code="invalid_active")
            link.active = changes["active"]
        if "exp" in changes:
            link.exp = parse_exp(changes["exp"], now)
        if "label" in changes:
            link.label = check_label(changes["label"])
        if "max_uses" in changes:
            link.max_uses = check_max_uses(changes["max_uses"])
        if "passcode" in changes:
            passcode = check_passcode(changes["passcode"])
            if link.passcode_hash is None or passcode is None:
                # Adding or removing P changes the flag that links already handed out carry.
                raise Conflict(
                    "only a passcode link's passcode can be changed; make a new link to add or "
                    "remove one",
                    code="passcode_flag",
                )
            link.passcode_hash = hash_secret(self.settings.hasher, passcode)
            link.attempts_left = self.settings.passcode_attempts
        link.updated_at = now
        self.session.commit()
        return link

    def revoke(self, link: Link, *, now: datetime) -> None:
        """Purge the ciphertext and the key; keep the row as a tombstone and the log."""
        if link.revoked_at is None:
            link.revoked_at = now
            link.active = False
        link.wrapped_key = None
        doomed = [f.blob_key for f in link.files if f.blob_key]
        for f in link.files:
            f.blob_key = None
        link.updated_at = now
        self.session.commit()
        self._delete_blobs(doomed)

    def _changeable(self, link: Link) -> None:
        if link.revoked_at is not None:
            raise Conflict("the link is revoked", code="revoked")
        if not link.long_term:
            raise Conflict(
                "only L (long-term) links may change their files; this one is finalized",
                code="finalized",
            )

    @_closes_files
    def add_files(self, link: Link, files: Sequence[NewFile], *, now: datetime) -> list[LinkFile]:
        self._changeable(link)
        if not files:
            raise BadRequest("no files given", code="no_files")
        if link.direct:
            raise Conflict("a U link carries exactly one file", code="direct_link")
        key = self.link_key(link)
        written: list[str] = []
        added = []
        try:
            start = max((f.position for f in link.files), default=-1) + 1
            # End the read transaction before writing blobs: the database blob store writes
            # through its own connection, and SQLite's one write lock would wait on itself.
            self.session.commit()
            for offset, new in enumerate(files):
                row = self._store_file(link.id, key, new, start + offset, now, written)
                link.files.append(row)
                added.append(row)
            link.updated_at = now
            self.session.commit()
        except BaseException:
            self.session.rollback()
            self._delete_blobs(written)
            raise
        return added

    def _file(self, link: Link, file_id: str) -> LinkFile:
        for f in link.files:
            if f.id == file_id and f.blob_key is not None:
                return f
        raise NotFound("No such file on this link.")

    @_closes_files
    def replace_file(self, link: Link, file_id: str, new: NewFile, *, now: datetime) -> LinkFile:
        """New content, same key, new IV; the old ciphertext is deleted once the row points away."""
        self._changeable(link)
        row = self._file(link, file_id)
        old_blob = row.blob_key
        written: list[str] = []
        self.session.commit()  # end the read transaction before writing blobs (see add_files)
        try:
            fresh = self._store_file(
                link.id, self.link_key(link), new, row.position, now, written, file_id
            )
            row.content_type = fresh.content_type
            row.blob_key = fresh.blob_key
            row.jwe_size = fresh.jwe_size
            row.last_updated = now
            link.updated_at = now
            self.session.commit()
        except BaseException:
            self.session.rollback()
            self._delete_blobs(written)
            raise
        self._delete_blobs([old_blob] if old_blob else [])
        return row

    def delete_file(self, link: Link, file_id: str, *, now: datetime) -> None:
        self._changeable(link)
        if link.direct:
            raise Conflict("a U link carries exactly one file", code="direct_link")
        row = self._file(link, file_id)
        blob = row.blob_key
        link.files.remove(row)
        link.updated_at = now
        self.session.commit()
        self._delete_blobs([blob] if blob else [])

    def accesses(self, link: Link, *, limit: int = 500) -> list[dict[str, Any]]:
        rows = self.session.scalars(
            select(Access)
            .where(Access.link_id == link.id)
            .order_by(Access.at.desc(), Access.id.desc())
            .limit(limit)
        )
        return [
            {
                "time": _iso(a.at),
                "recipient": a.recipient,
                "action": a.action,
                "outcome": a.outcome,
                "file_id": a.file_id,
            }
            for a in rows
        ]

    def list_links(self, account_id: int | None) -> list[Link]:
        query = select(Link).order_by(Link.created_at.desc())
        if account_id is not None:
            query = query.where(Link.account_id == account_id)
        return list(self.session.scalars(query))


# Prebuilt statements for the data plane, run on the DBAPI cursor (shlhost.storage.rawsql):
# compiled once per dialect, so a request pays only for binding its values.
_LINKS, _FILES, _ACCESS = Link.__table__, LinkFile.__table__, Access.__table__
_ID, _NOW = bindparam("link_id"), bindparam("now")
# The link and its files in one query: a row per file (one row with no file if it has none).
_FILE_COLUMNS = ("id", "content_type", "blob_key", "jwe_size", "last_updated")
_LOAD_LINK = RawStatement(
    select(
        _LINKS.c.id,
        _LINKS.c.revoked_at,
        _LINKS.c.active,
        _LINKS.c.exp,
        _LINKS.c.attempts_left,
        _LINKS.c.max_uses,
        _LINKS.c.uses,
        _LINKS.c.direct,
        _LINKS.c.long_term,
        _LINKS.c.passcode_hash,
        _LINKS.c.updated_at,
        *(_FILES.c[name].label(f"file_{name}") for name in _FILE_COLUMNS),
    )
    .select_from(_LINKS.outerjoin(_FILES, _FILES.c.link_id == _LINKS.c.id))
    .where(_LINKS.c.id == _ID)
    .order_by(_FILES.c.position)
)
FileRow = namedtuple("FileRow", _FILE_COLUMNS)
# An attempt is not a change: updated_at is set to itself to keep its onupdate away.
_SPEND_ATTEMPT = RawStatement(
    update(_LINKS)
    .where(_LINKS.c.id == _ID, Link.live(_NOW), _LINKS.c.attempts_left > 0)
    .values(attempts_left=_LINKS.c.attempts_left - 1, updated_at=_LINKS.c.updated_at)
    .returning(_LINKS.c.attempts_left)
)
_BLOB_KEY = select(_FILES.c.blob_key).where(_FILES.c.id == bindparam("file_id"))
_SERVABLE_FILE = (
    select(_FILES.c.blob_key)
    .select_from(_FILES.join(_LINKS))
    .where(_FILES.c.id == bindparam("file_id"), _FILES.c.link_id == _ID, Link.servable(_NOW))
)
