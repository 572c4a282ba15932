"""The database: declarative base, engine and sessions, and a portable upsert.

PostgreSQL in production, SQLite in single-server mode. On SQLite every transaction starts
with BEGIN IMMEDIATE, so writers queue on the database lock (busy timeout) instead of failing
halfway; WAL lets readers go on meanwhile.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, MetaData, bindparam, create_engine, event, func
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on both PostgreSQL and SQLite (which drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


def make_engine(url: str) -> Engine:
    """An engine for `url`, with SQLite set up for several processes."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy, not pysqlite, issue BEGIN (pysqlite's own handling breaks
            # SAVEPOINTs and takes locks too late).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def engine_for(url: str) -> Engine:
    """One engine per URL and process: a forked child (an RQ work horse, a gunicorn
    worker) never reuses its parent's pooled connections."""
    return _engine(url, os.getpid())


@functools.cache
def _engine(url: str, pid: int) -> Engine:
    return make_engine(url)


def session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(engine_for(url), expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose work is committed at the end of the block, or rolled back."""
    with factory() as session, session.begin():
        yield session


def upsert(
    session: Session,
    model: type[Base],
    keys: dict[str, Any],
    values: dict[str, Any],
    keep_if_null: tuple[str, ...] = (),
) -> int:
    """Insert or update one row identified by the unique columns `keys`; returns its id.

    One statement (INSERT … ON CONFLICT DO UPDATE … RETURNING id) on both dialects. Columns
    in `keep_if_null` keep their stored value when the new one is NULL. The statement is
    built once per shape and reused with bound parameters (it sits on the launch path).
    """
    stmt = _upsert_statement(
        model.__table__, session.get_bind().dialect.name, tuple(keys), tuple(values), keep_if_null
    )
    return session.execute(stmt, {**keys, **values}).scalar_one()


@functools.lru_cache(maxsize=64)
def _upsert_statement(
    table: Any,
    dialect: str,
    keys: tuple[str, ...],
    values: tuple[str, ...],
    keep_if_null: tuple[str, ...],
) -> Any:
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(table).values({name: bindparam(name) for name in keys + values})
    update: dict[str, Any] = {
        name: func.coalesce(stmt.excluded[name], table.c[name])
        if name in keep_if_null
        else stmt.excluded[name]
        for name in values
    }
    if not update:  # nothing to change: touch a key column so RETURNING still answers
        update = {keys[0]: stmt.excluded[keys[0]]}
    stmt = stmt.on_conflict_do_update(index_elements=list(keys), set_=update)
    return stmt.returning(table.c.id)


def upsert_many(
    session: Session,
    model: type[Base],
    keys: tuple[str, ...],
    rows: list[dict[str, Any]],
    *,
    update_columns: tuple[str, ...],
    keep_if_null: tuple[str, ...] = (),
    batch: int = 1000,
) -> list[int]:
    """Upsert many rows (unique on `keys`, which must not repeat within `rows`); returns
    their ids in the order of `rows`. Batched INSERT … ON CONFLICT … RETURNING, a few
    statements for thousands of rows."""
    if not rows:
        return []
    table = model.__table__
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    stmt = insert(table)
    update: dict[str, Any] = {
        name: func.coalesce(stmt.excluded[name], table.c[name])
        if name in keep_if_null
        else stmt.excluded[name]
        for name in update_columns
    } or {keys[0]: stmt.excluded[keys[0]]}
    # Each returned row names its keys: RETURNING's order is not the rows' order for rows that
    # hit a conflict (seen on PostgreSQL with SQLAlchemy 2.1, `sort_by_parameter_order`
    # notwithstanding), and a roster sync that paired ids with the wrong members gave one
    # student another's roles.
    stmt = stmt.on_conflict_do_update(index_elements=list(keys), set_=update).returning(
        table.c.id, *(table.c[name] for name in keys)
    )
    found: dict[tuple[Any, ...], int] = {}
    for start in range(0, len(rows), batch):
        for row_id, *key in session.execute(stmt, rows[start : start + batch]):
            found[tuple(key)] = row_id
    return [found[tuple(row[name] for name in keys)] for row in rows]
