"""Engine and session setup for SQLite (single host) and PostgreSQL (psycopg 3).

SQLite: WAL journal, ``synchronous=FULL`` (a commit is on disk before we acknowledge), a busy
timeout, foreign keys on, and every transaction opened with ``BEGIN IMMEDIATE`` so two writers
never deadlock upgrading a read lock ("database is locked").
PostgreSQL: ``pool_pre_ping`` so a restarted server is reconnected to transparently.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, make_url
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from storage.errors import DatabaseUnavailable

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000


def normalise_url(url: str) -> URL:
    """Parse a database URL; plain ``postgresql://`` URLs get the psycopg 3 driver."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError(f"unsupported database {parsed.get_backend_name()!r}: use sqlite or postgresql")
    return parsed


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def make_engine(url: str, *, pool_size: int = 5) -> Engine:
    """Create an engine with the project's durability settings for the URL's backend."""
    parsed = normalise_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            parsed,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
            pool_size=pool_size,
            max_overflow=10,
        )
        _configure_sqlite(engine)
        return engine
    return create_engine(
        parsed,
        pool_pre_ping=True,
        pool_size=pool_size,
        max_overflow=10,
        pool_timeout=10,
        connect_args={"connect_timeout": 5},
    )


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
        # Take transaction control from the sqlite3 module so BEGIN IMMEDIATE below is ours.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def is_unavailable(exc: BaseException) -> bool:
    """True for driver errors that mean "the database cannot serve now" rather than a bug."""
    if isinstance(exc, PoolTimeout):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, OperationalError):
        return True
    orig = getattr(exc, "orig", None)
    return orig is not None and type(orig).__module__.startswith("psycopg") and "connection" in str(orig)


@contextlib.contextmanager
def translate_errors(what: str) -> Iterator[None]:
    """Turn driver errors meaning "unavailable" into :class:`DatabaseUnavailable`."""
    try:
        yield
    except DBAPIError as exc:
        if is_unavailable(exc):
            raise DatabaseUnavailable(f"database unavailable while {what}: {exc.orig}") from exc
        raise
    except PoolTimeout as exc:
        raise DatabaseUnavailable(f"database unavailable while {what}: {exc}") from exc


@contextlib.contextmanager
def transaction(factory: sessionmaker[Session], what: str) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on error, driver errors translated."""
    with translate_errors(what), factory() as session, session.begin():
        yield session
