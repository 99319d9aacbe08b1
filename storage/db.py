"""Engine and session setup for SQLite (single host) and PostgreSQL (psycopg 3).

SQLite: WAL journal, ``synchronous=FULL`` (a commit is on disk before we acknowledge), a busy
timeout, foreign keys on, and every transaction opened with ``BEGIN IMMEDIATE`` so two writers
never deadlock upgrading a read lock ("database is locked").
PostgreSQL: ``pool_pre_ping`` so a restarted server is reconnected to transparently.

A transaction on a connection (or engine) with the execution option ``COMMIT_FLUSH: False``
commits without flushing: SQLite ``synchronous=NORMAL`` for it (WAL: safe against a crash of the
process, a power cut may lose the last commits), PostgreSQL ``synchronous_commit = off``. Only
the receiver's index rows use it, whose files carry what rebuilds them (storage/receipt.py,
storage/recovery.py). Either way a power cut loses a suffix of the commits, never one in the
middle: a later flushing commit writes out the log up to itself.
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
COMMIT_FLUSH = "pacs_triage_commit_flush"  # execution option: False = commit without a flush
_SYNCHRONOUS = "pacs_triage_synchronous"  # the SQLite connection's synchronous setting now


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
    engine = create_engine(
        parsed,
        pool_pre_ping=True,
        pool_size=pool_size,
        max_overflow=10,
        pool_timeout=10,
        connect_args={"connect_timeout": 5},
    )

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        if conn.get_execution_options().get(COMMIT_FLUSH) is False:
            conn.exec_driver_sql("SET LOCAL synchronous_commit = off")  # this transaction only

    return engine


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, record: Any) -> None:
        # Take transaction control from the sqlite3 module so BEGIN IMMEDIATE below is ours.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        record.info[_SYNCHRONOUS] = "FULL"
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # The setting belongs to the connection and cannot change inside a transaction: set it
        # before BEGIN, only when it differs from what this connection's last transaction used.
        level = "NORMAL" if conn.get_execution_options().get(COMMIT_FLUSH) is False else "FULL"
        info = conn.connection.info
        if info.get(_SYNCHRONOUS, "FULL") != level:
            conn.exec_driver_sql(f"PRAGMA synchronous={level}")
            info[_SYNCHRONOUS] = level
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
