"""Core statements compiled once per dialect and run on the DBAPI cursor.

For the data plane's hot path: SQLAlchemy's per-execution machinery (execution context,
cache key, result object, events) and the Session's transaction bookkeeping cost several
times what the database itself does for a one-row statement. A ``RawStatement`` compiles
its statement once for each dialect and keeps the bind and result processors of its
column types, so values are converted exactly as SQLAlchemy converts them (``UTCDateTime``
is UTC text on SQLite, an aware ``datetime`` on PostgreSQL; booleans are 0/1 on SQLite).
It runs on either

- a SQLAlchemy ``Connection`` (``Session.connection()``): the session's transaction, or
- a ``RawTransaction``: one pooled DBAPI connection and one transaction, begun the way
  the engine begins its own (``shlhost.storage.db.begin_dbapi``: the writer lock and
  ``BEGIN IMMEDIATE`` on SQLite) and ended by ``commit``, ``rollback`` or ``close``.

Errors are raised as SQLAlchemy's (``OperationalError``, ...), without their parameters,
and a connection the database dropped leaves the pool, as with SQLAlchemy's own execution.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import ClauseElement

from shlhost.storage.db import begin_dbapi

_Processor = Callable[[Any], Any] | None


class RawTransaction:
    """A transaction on one pooled DBAPI connection, checked out at its first statement.

    After ``commit`` or ``rollback`` the connection is back in the pool; the next statement
    checks one out again and begins a new transaction. ``close`` rolls back whatever is
    still open. Use it as a context manager.

    On SQLite, SELECTs that come before the first write run outside the transaction (WAL:
    each sees the last commit and takes no lock); the first write begins it, with the
    writer lock and ``BEGIN IMMEDIATE``. So the lock that every writer queues for is held
    only for the writes and the COMMIT. A write that depends on what was read must check
    it again itself (the data plane's conditional ``UPDATE ... RETURNING`` does). On
    PostgreSQL the first statement, read or write, begins the transaction.
    """

    def __init__(self, engine: Engine) -> None:
        self.dialect = engine.dialect
        self._engine = engine
        self._reads_outside = engine.dialect.name == "sqlite"
        self._pooled: Any = None  # the pool's proxy: closing it returns the connection
        self._begun = False

    def dbapi_connection(self, write: bool = True) -> Any:
        pooled = self._pooled
        if pooled is None:
            pooled = self._pooled = self._engine.raw_connection()
            self._begun = False
        if not self._begun and (write or not self._reads_outside):
            try:
                begin_dbapi(self.dialect, pooled.driver_connection)
            except BaseException:
                self._pooled = None
                pooled.close()  # the pool's reset rolls back
                raise
            self._begun = True
        return pooled.driver_connection

    def invalidate(self, exc: BaseException) -> None:
        if self._pooled is not None:
            pooled, self._pooled = self._pooled, None
            pooled.invalidate(exc)

    def commit(self) -> None:
        pooled, self._pooled = self._pooled, None
        if pooled is not None:
            try:
                pooled.driver_connection.commit()
            finally:
                pooled.close()  # a failed COMMIT is rolled back by the pool's reset

    def rollback(self) -> None:
        pooled, self._pooled = self._pooled, None
        if pooled is not None:
            try:
                pooled.driver_connection.rollback()
            finally:
                pooled.close()

    close = rollback

    def __enter__(self) -> RawTransaction:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.rollback()


class _Compiled:
    __slots__ = ("sql", "positional", "reads", "binds", "row", "results")

    def __init__(self, stmt: Any, dialect: Dialect) -> None:
        compiled = stmt.compile(dialect=dialect)
        self.sql: str = compiled.string
        self.positional: bool = bool(compiled.positional)
        self.reads: bool = bool(stmt.is_select)  # a SELECT: no write lock needed
        names = (
            list(compiled.positiontup or ())
            if self.positional
            else list(dict.fromkeys(compiled.bind_names.values()))
        )
        # (name, the statement's own value for a literal such as ``uses + 1``, processor)
        self.binds: list[tuple[str, Any, _Processor]] = []
        for name in names:
            bind = compiled.binds[name]
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            self.binds.append((name, bind.effective_value, processor))
        # A SELECT's columns, or RETURNING's; none for text() without .columns()
        columns = list(getattr(stmt, "exported_columns", ()))
        self.row: Any = namedtuple("Row", [c.key for c in columns]) if columns else None
        self.results: list[_Processor] = [
            c.type.dialect_impl(dialect).result_processor(dialect, None) for c in columns
        ]

    def parameters(self, params: Mapping[str, Any]) -> Any:
        if self.positional:
            out: list[Any] = []
            for name, default, proc in self.binds:
                value = params.get(name, default)
                out.append(proc(value) if proc is not None else value)
            return out
        named: dict[str, Any] = {}
        for name, default, proc in self.binds:
            value = params.get(name, default)
            named[name] = proc(value) if proc is not None else value
        return named

    def make_row(self, raw: Any) -> Any:
        return self.row._make(
            value if proc is None else proc(value)
            for value, proc in zip(raw, self.results, strict=True)
        )


class RawStatement:
    """One Core statement, run with ``first``, ``all`` or ``run``."""

    def __init__(self, stmt: ClauseElement) -> None:
        self.stmt = stmt
        self._compiled: dict[Dialect, _Compiled] = {}

    def _execute(
        self,
        conn: Connection | RawTransaction,
        params: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        many: bool = False,
    ) -> tuple[_Compiled, Any]:
        dialect = conn.dialect
        compiled = self._compiled.get(dialect)
        if compiled is None:
            compiled = self._compiled[dialect] = _Compiled(self.stmt, dialect)
        if isinstance(conn, RawTransaction):
            dbapi_conn = conn.dbapi_connection(write=not compiled.reads)
        else:
            dbapi_conn = conn.connection.driver_connection
        cursor = dbapi_conn.cursor()
        if many:
            parameters: Any = [compiled.parameters(p) for p in params]  # type: ignore[arg-type]
        else:
            parameters = compiled.parameters(params)  # type: ignore[arg-type]
        try:
            if many:
                cursor.executemany(compiled.sql, parameters)
            else:
                cursor.execute(compiled.sql, parameters)
        except dialect.loaded_dbapi.Error as exc:
            cursor.close()
            gone = dialect.is_disconnect(exc, dbapi_conn, cursor)
            if gone:
                conn.invalidate(exc)
            raise DBAPIError.instance(
                compiled.sql,
                parameters,
                exc,
                dialect.loaded_dbapi.Error,
                hide_parameters=True,
                connection_invalidated=gone,
                dialect=dialect,
            ) from exc
        return compiled, cursor

    def first(self, conn: Connection | RawTransaction, params: Mapping[str, Any]) -> Any:
        """The first row (a named tuple), or None."""
        compiled, cursor = self._execute(conn, params)
        try:
            raw = cursor.fetchone()
        finally:
            cursor.close()
        return None if raw is None else compiled.make_row(raw)

    def all(self, conn: Connection | RawTransaction, params: Mapping[str, Any]) -> list[Any]:
        compiled, cursor = self._execute(conn, params)
        try:
            rows = cursor.fetchall()
        finally:
            cursor.close()
        return [compiled.make_row(raw) for raw in rows]

    def run(self, conn: Connection | RawTransaction, params: Mapping[str, Any]) -> None:
        """Execute a statement that returns nothing."""
        _compiled, cursor = self._execute(conn, params)
        cursor.close()

    def run_many(
        self, conn: Connection | RawTransaction, params: Sequence[Mapping[str, Any]]
    ) -> None:
        """Execute a statement that returns nothing once for each set of parameters."""
        if params:
            _compiled, cursor = self._execute(conn, params, many=True)
            cursor.close()
