"""RawStatement and RawTransaction (shlhost.storage.rawsql) against the test database.

The data plane's statements run on the DBAPI cursor; what they write and read must be
exactly what SQLAlchemy writes and reads for the same columns, on SQLite (datetimes as
text, booleans as 0/1) and on PostgreSQL.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, bindparam, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shlhost.shl import links, uses
from shlhost.storage.models import Access, Link
from shlhost.storage.rawsql import RawStatement, RawTransaction

NOW = datetime(2026, 11, 21, 10, 0, 0, 123456, tzinfo=UTC)


def new_link(session: Session, **columns: Any) -> str:
    link_id = secrets.token_urlsafe(32)
    values: dict[str, Any] = {
        "id": link_id,
        "management_token_hash": "0" * 64,
        "server_keyed": True,
        "long_term": False,
        "direct": False,
        "active": True,
        "uses": 0,
        **columns,
    }
    session.add(Link(**values))
    session.commit()
    return link_id


def test_rows_read_raw_equal_what_the_orm_reads(engine: Engine, session: Session) -> None:
    exp = NOW + timedelta(days=3)
    link_id = new_link(session, exp=exp, long_term=True, max_uses=7, passcode_hash="h")
    with engine.connect() as conn:
        row = links._LOAD_LINK.first(conn, {"link_id": link_id})
        conn.rollback()
    assert row.exp == exp and row.exp.tzinfo is not None
    assert row.long_term is True and row.direct is False and row.active is True
    assert (row.max_uses, row.uses, row.passcode_hash, row.revoked_at) == (7, 0, "h", None)
    assert row.file_id is None  # no files: one row, its file columns empty
    orm = session.get(Link, link_id)
    assert orm is not None
    for name in row._fields:
        if not name.startswith("file_"):
            assert getattr(row, name) == getattr(orm, name), name


def test_values_written_raw_read_back_through_the_orm(engine: Engine, session: Session) -> None:
    link_id = new_link(session)
    with RawTransaction(engine) as tx:
        uses.LOG_ACCESS.run(
            tx,
            {"link_id": link_id, "at": NOW, "recipient": "Dr R", "action": "manifest",
             "outcome": "ok", "file_id": None},
        )
        tx.commit()
    logged = session.scalars(select(Access).where(Access.link_id == link_id)).one()
    assert logged.at == NOW
    assert (logged.recipient, logged.action, logged.outcome, logged.file_id) == (
        "Dr R", "manifest", "ok", None)
    # ... and the database compares them as SQLAlchemy's own statements do.
    found = session.scalar(select(Access.id).where(Access.link_id == link_id, Access.at == NOW))
    assert found == logged.id


def test_the_conditional_update_rechecks_liveness(engine: Engine, session: Session) -> None:
    link_id = new_link(session, max_uses=2, exp=NOW + timedelta(minutes=1))
    with RawTransaction(engine) as tx:
        spent = [uses.SPEND_USE.first(tx, {"link_id": link_id, "now": NOW}) for _ in range(3)]
        late = uses.SPEND_USE.first(
            tx, {"link_id": link_id, "now": NOW + timedelta(minutes=2)})
        tx.commit()
    assert [row and row.uses for row in spent] == [1, 2, None]
    assert late is None
    session.expire_all()
    assert session.get(Link, link_id).uses == 2  # type: ignore[union-attr]


def test_rollback_and_close_discard_the_transaction(engine: Engine, session: Session) -> None:
    link_id = new_link(session)
    for end in ("rollback", "close"):
        tx = RawTransaction(engine)
        assert uses.SPEND_USE.first(tx, {"link_id": link_id, "now": NOW}) is not None
        getattr(tx, end)()
    with pytest.raises(RuntimeError), RawTransaction(engine) as tx:
        uses.SPEND_USE.first(tx, {"link_id": link_id, "now": NOW})
        raise RuntimeError("boom")
    session.expire_all()
    assert session.get(Link, link_id).uses == 0  # type: ignore[union-attr]


def test_a_new_transaction_after_commit(engine: Engine, session: Session) -> None:
    link_id = new_link(session)
    with RawTransaction(engine) as tx:
        uses.SPEND_USE.first(tx, {"link_id": link_id, "now": NOW})
        tx.commit()
        uses.SPEND_USE.first(tx, {"link_id": link_id, "now": NOW})
        # left open: the context manager rolls the second one back
    session.expire_all()
    assert session.get(Link, link_id).uses == 1  # type: ignore[union-attr]


def test_errors_are_sqlalchemys_and_hide_their_parameters(engine: Engine) -> None:
    secret = "a-recipient-that-must-not-be-logged"
    with pytest.raises(IntegrityError) as caught, RawTransaction(engine) as tx:
        uses.LOG_ACCESS.run(
            tx,
            {"link_id": "no such link", "at": NOW, "recipient": secret, "action": "manifest",
             "outcome": "ok", "file_id": None},
        )
        tx.commit()  # SQLite checks the foreign key at the statement; this covers both
    assert secret not in str(caught.value)
    # The connection went back to the pool in a usable state.
    with RawTransaction(engine) as tx:
        assert RawStatement(select(bindparam("x", 1))).first(tx, {}) is not None


def test_literals_of_the_statement_are_bound(engine: Engine, session: Session) -> None:
    link_id = new_link(session, attempts_left=1)
    with RawTransaction(engine) as tx:
        first = links._SPEND_ATTEMPT.first(tx, {"link_id": link_id, "now": NOW})
        second = links._SPEND_ATTEMPT.first(tx, {"link_id": link_id, "now": NOW})
        tx.commit()
    assert first is not None and first.attempts_left == 0
    assert second is None  # attempts_left > 0 no longer holds


def test_insert_without_a_returning_clause(engine: Engine, session: Session) -> None:
    link_id = new_link(session)
    statement = RawStatement(insert(Access.__table__).values(
        link_id=bindparam("link_id"), at=bindparam("at", type_=Access.__table__.c.at.type),
        action="file", outcome="ok"))
    with RawTransaction(engine) as tx:
        statement.run(tx, {"link_id": link_id, "at": NOW})
        tx.commit()
    assert session.scalar(select(Access.at).where(Access.link_id == link_id)) == NOW
