"""How commands open the database: only ``serve``, ``worker`` and ``db upgrade`` migrate it.

Every other command (``status``, ``jobs``, ``deliveries``, ``studies``, ``db backup``) opens it as
it is: never creating a SQLite file that is not there (a wrong home would otherwise look like an
empty node), and refusing a schema that is behind (or ahead of) this version with what to run.
A database that cannot be reached, or a wrong URL, is one line naming the URL (password hidden)
and where it was set, and exit status 2, never a traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import make_url
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from daemon.cli.common import fail
from daemon.config import Config
from storage.db import make_engine, make_session_factory
from storage.errors import StorageUnavailable


def shown_url(config: Config) -> str:
    """The database URL with any password hidden."""
    return make_url(config.effective_database_url).render_as_string(hide_password=True)


def sqlite_path(config: Config) -> Path | None:
    url = make_url(config.effective_database_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(url.database)


def unreachable(config: Config, exc: Exception) -> str:
    """One line for a database that cannot be opened (driver messages span several lines)."""
    reason = " ".join(str(exc).split())
    return (
        f"cannot open the database {shown_url(config)}: {reason} "
        "(check database_url / PACS_TRIAGE_DATABASE_URL, and that the server runs)"
    )


@dataclass(frozen=True)
class Database:
    """What the operator commands need: the configuration and the database (no spool, no ingest)."""

    config: Config
    engine: Engine
    sessions: sessionmaker[Session]


@contextmanager
def existing_node(config: Config) -> Iterator[Database]:
    """The node's database as it is (no migrations, nothing created); exit 1 or 2 with one line."""
    from storage.schema import expected_revision, stored_revision

    path = sqlite_path(config)
    if path is not None and not path.is_file():
        fail(
            f"no database at {path}: nothing was received with this home ({config.home}) yet. "
            "Point --config or PACS_TRIAGE_HOME at the node's data directory, or start `pacs-triage serve` "
            "(it creates the database)",
            code=1,
        )
    engine = make_engine(config.effective_database_url, pool_size=2)
    try:
        try:
            have = stored_revision(engine)
            want = expected_revision()
        except StorageUnavailable as exc:
            fail(unreachable(config, exc), code=2)
        if have != want:
            if have is None:
                fail(
                    f"the database {shown_url(config)} has no pacs-triage schema: run `pacs-triage db upgrade`"
                )
            fail(
                f"the database schema is at revision {have}, this version of pacs-triage needs {want}: "
                "run `pacs-triage db upgrade` (or restart `pacs-triage serve`, which upgrades it), then retry"
            )
        yield Database(config=config, engine=engine, sessions=make_session_factory(engine))
    finally:
        engine.dispose()
