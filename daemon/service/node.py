"""Wires storage for one process from the configuration: engine, migrations, spool, ingest."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Config
from daemon.dicom.stored import describe_stored
from storage.db import make_engine, make_session_factory
from storage.ingest import Ingest
from storage.migrate import upgrade
from storage.recovery import recover_index
from storage.spool import Spool

log = logging.getLogger(__name__)


@dataclass
class Node:
    config: Config
    engine: Engine
    sessions: sessionmaker[Session]
    spool: Spool
    ingest: Ingest

    def close(self) -> None:
        self.engine.dispose()


def open_node(config: Config, *, migrate: bool = True, open_spool: bool = True) -> Node:
    """Connect to the database (applying migrations when ``migrate``) and open the spool."""
    config.home.mkdir(parents=True, exist_ok=True)
    engine = make_engine(config.effective_database_url, pool_size=max(5, config.dicom.max_associations))
    if migrate:
        revision = upgrade(engine)
        log.info(
            "database %s at schema revision %s", engine.url.render_as_string(hide_password=True), revision
        )
    sessions = make_session_factory(engine)
    spool = Spool(config.spool_dir, min_free_bytes=config.storage.min_free_bytes)
    if open_spool:
        spool.open()
        if migrate:  # the main process of `serve`: receiver children and CLI commands leave this
            recover_index(sessions, spool, describe_stored)  # rows a power cut took; orphans removed
    return Node(config=config, engine=engine, sessions=sessions, spool=spool, ingest=Ingest(sessions, spool))
