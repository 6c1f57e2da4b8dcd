"""Database models. Liveness of a link is derived from these columns, never stored."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    and_,
    or_,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.sql.elements import ColumnElement

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in Python on every backend (SQLite keeps naive UTC text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def link_status(link: Any, now: datetime) -> str:
    """The status of a link, or of any row with a link's columns (the data plane reads rows)."""
    if link.revoked_at is not None:
        return "revoked"
    if not link.active:
        return "paused"
    if link.exp is not None and link.exp <= now:
        return "expired"
    if link.attempts_left is not None and link.attempts_left <= 0:
        return "locked"
    if link.max_uses is not None and link.uses >= link.max_uses:
        return "used_up"
    return "active"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Link(Base):
    __tablename__ = "links"

    # 32 random bytes, base64url: 256 bits of entropy in the manifest url.
    id: Mapped[str] = mapped_column(String(43), primary_key=True)
    account_id: Mapped[int | None] = mapped_column(ForeignKey("accounts.id", ondelete="SET NULL"), index=True)
    management_token_hash: Mapped[str] = mapped_column(String(64))
    # The link key, wrapped under the instance KEK. None when the client holds the key
    # (pre-encrypted uploads) or after revocation (crypto-shredded).
    wrapped_key: Mapped[bytes | None] = mapped_column(LargeBinary)
    server_keyed: Mapped[bool] = mapped_column(Boolean)
    label: Mapped[str | None] = mapped_column(String(80))
    long_term: Mapped[bool] = mapped_column(Boolean, default=False)
    direct: Mapped[bool] = mapped_column(Boolean, default=False)  # flag U
    passcode_hash: Mapped[str | None] = mapped_column(String(255))
    attempts_left: Mapped[int | None] = mapped_column(Integer)
    exp: Mapped[datetime | None] = mapped_column(UTCDateTime)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    max_uses: Mapped[int | None] = mapped_column(Integer)
    uses: Mapped[int] = mapped_column(Integer, default=0)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    # For a link made from the owner's record: what to export (JSON). An L link's file is
    # regenerated from it whenever the record changes.
    record_query: Mapped[str | None] = mapped_column(Text)

    files: Mapped[list[LinkFile]] = relationship(
        back_populates="link", order_by="LinkFile.position", cascade="all, delete-orphan"
    )

    @property
    def flag(self) -> str:
        return "".join(
            letter
            for letter, on in (("L", self.long_term), ("P", self.passcode_hash), ("U", self.direct))
            if on
        )

    def status(self, now: datetime) -> str:
        """One word for the owner: revoked, paused, expired, locked, used_up or active."""
        return link_status(self, now)

    @classmethod
    def servable(cls, now: datetime) -> ColumnElement[bool]:
        """SQL for: files may still be served (not revoked, paused or expired).

        A ticket issued by a manifest request that spent the last use or attempt stays
        good for its few minutes, so uses and attempts are not part of this test.
        """
        return and_(
            cls.revoked_at.is_(None),
            cls.active.is_(True),
            or_(cls.exp.is_(None), cls.exp > now),
        )

    @classmethod
    def live(cls, now: Any, uses: Any = 1) -> ColumnElement[bool]:
        """SQL twin of ``status(now) == "active"``, for atomic conditional updates; with
        ``uses`` (a number or a bind parameter), live with room for that many more uses."""
        room = (
            cls.uses < cls.max_uses
            if isinstance(uses, int) and uses == 1
            else cls.uses + uses <= cls.max_uses
        )
        return and_(
            cls.servable(now),
            or_(cls.attempts_left.is_(None), cls.attempts_left > 0),
            or_(cls.max_uses.is_(None), room),
        )


class LinkFile(Base):
    __tablename__ = "link_files"

    id: Mapped[str] = mapped_column(String(22), primary_key=True)
    link_id: Mapped[str] = mapped_column(ForeignKey("links.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    content_type: Mapped[str] = mapped_column(String(64))
    # Where the compact JWE lives in the blob store; None once purged.
    blob_key: Mapped[str | None] = mapped_column(String(200))
    jwe_size: Mapped[int] = mapped_column(Integer)
    last_updated: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    link: Mapped[Link] = relationship(back_populates="files")


class Access(Base):
    """The owner's access log: every request that named a known link."""

    __tablename__ = "accesses"
    __table_args__ = (Index("ix_accesses_link_id_at", "link_id", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    link_id: Mapped[str] = mapped_column(ForeignKey("links.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    recipient: Mapped[str | None] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(16))  # manifest | file | direct
    outcome: Mapped[str] = mapped_column(String(32))  # ok | wrong_passcode | dead | ...
    file_id: Mapped[str | None] = mapped_column(String(22))


# -- accounts and the versioned record store -------------------------------------------


class Account(Base):
    """A person or a system that owns patients' records and links."""

    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    email: Mapped[str] = mapped_column(String(254), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiToken(Base):
    """A bearer token for programs; only its SHA-256 is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    label: Mapped[str | None] = mapped_column(String(80))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ResourceRow(Base):
    """One version of one FHIR resource. History is never deleted; ``current`` marks the
    version a read returns. ``content`` is the resource without server-set meta fields."""

    __tablename__ = "resources"
    __table_args__ = (
        # Current rows of a type in id order: exports, searches and the importer's lookups.
        Index("ix_resources_current_type", "account_id", "resource_type", "current", "resource_id"),
        Index("ix_resources_patient", "account_id", "patient_id"),
        Index("ix_resources_updated", "account_id", "last_updated"),
        Index("ix_resources_content", "account_id", "content_hash"),
    )

    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True)
    resource_type: Mapped[str] = mapped_column(String(64), primary_key=True)
    resource_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    current: Mapped[bool] = mapped_column(Boolean)
    last_updated: Mapped[datetime] = mapped_column(UTCDateTime)
    content: Mapped[str] = mapped_column(Text)
    # SHA-256 of the canonical clinical content (no id, no meta): equal hash, same data.
    content_hash: Mapped[str] = mapped_column(String(64))
    source: Mapped[str | None] = mapped_column(String(500))
    import_id: Mapped[int | None] = mapped_column(ForeignKey("imports.id", ondelete="SET NULL"))
    patient_id: Mapped[str | None] = mapped_column(String(64))
    # The resource's clinical date (ISO 8601 prefix) for date-range exports.
    clinical_date: Mapped[str | None] = mapped_column(String(35))


class ResourceIdentifier(Base):
    """Business identifiers of current versions, for matching incoming resources."""

    __tablename__ = "resource_identifiers"
    __table_args__ = (Index("ix_resource_identifiers_lookup", "account_id", "resource_type", "system", "value"),)

    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True)
    resource_type: Mapped[str] = mapped_column(String(64), primary_key=True)
    resource_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    system: Mapped[str] = mapped_column(String(255), primary_key=True)
    value: Mapped[str] = mapped_column(String(255), primary_key=True)


class ImportRecord(Base):
    """One $import: the commit that the resources it wrote point back to."""

    __tablename__ = "imports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    source: Mapped[str] = mapped_column(String(500))
    format: Mapped[str] = mapped_column(String(16))
    counts: Mapped[str] = mapped_column(Text)  # JSON
    provenance_id: Mapped[str | None] = mapped_column(String(64))


class ResourceConflict(Base):
    """An incoming version that disagrees with the stored one: kept until the owner decides."""

    __tablename__ = "conflicts"
    __table_args__ = (Index("ix_conflicts_open", "account_id", "resolved_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    resource_type: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str] = mapped_column(String(64))
    stored_version: Mapped[int] = mapped_column(Integer)
    incoming_content: Mapped[str] = mapped_column(Text)
    incoming_hash: Mapped[str] = mapped_column(String(64))
    incoming_source: Mapped[str | None] = mapped_column(String(500))
    import_id: Mapped[int | None] = mapped_column(ForeignKey("imports.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    resolution: Mapped[str | None] = mapped_column(String(32))


class Blob(Base):
    """Ciphertext kept in the database (``BLOB_BACKEND = "database"``), one row per blob key.

    Written and deleted only by ``DatabaseBlobStore``, each in its own short transaction.
    """

    __tablename__ = "blobs"

    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Remote(Base):
    """A link this account pulls from (``shlhost pull``): its key wrapped under the KEK,
    and the ``lastUpdated`` of each file at the last pull, so unchanged files are skipped."""

    __tablename__ = "remotes"
    __table_args__ = (UniqueConstraint("account_id", "url", name="uq_remotes_account_id_url"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(String(500))
    wrapped_key: Mapped[bytes] = mapped_column(LargeBinary)
    label: Mapped[str | None] = mapped_column(String(80))
    flag: Mapped[str] = mapped_column(String(8), default="")
    last_pulled: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_file_updates: Mapped[str | None] = mapped_column(Text)  # JSON: file position -> lastUpdated
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
