"""Files of record and the rows that name them: who may place or remove one, and when.

Invariant: a committed ``instances`` row always names an existing spool file. Two rules keep it
under any interleaving of associations, receiver processes and hosts:

- a store makes sure its file exists *while holding the instance lock*, and commits its row
  before releasing it (:class:`Placement`);
- a file is removed only while holding the same lock, after checking that no row names it
  (:func:`remove_if_unnamed`): a superseded version, the file of a store that failed, or an
  orphan found at start-up (:func:`remove_orphans`).

The instance lock is keyed by the SOP Instance UID's hash (the first part of the file's name, so
an orphan's lock is known without its UID): a transaction-scoped advisory lock on PostgreSQL;
on SQLite every write transaction is ``BEGIN IMMEDIATE`` (one writer at a time), which already
serialises both rules.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from sqlalchemy import select, text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, sessionmaker

from storage.db import transaction
from storage.models import Instance, Result
from storage.receipt import Delivery
from storage.spool import OBJECTS_DIR, Spool, uid_key

log = logging.getLogger(__name__)

_FILE_NAME = re.compile(r"[0-9a-f]{64}-[0-9a-f]{64}\.dcm")  # as Spool.relative_path_for names them
_LOCK = text("SELECT pg_advisory_xact_lock(:k)")
_TRY_LOCK = text("SELECT pg_try_advisory_xact_lock(:k)")


def _lock_key(uid_hash: str) -> int:
    """A signed 64-bit advisory-lock key from the hex hash of a SOP Instance UID."""
    value = int(uid_hash[:16], 16)
    return value - (1 << 64) if value >= (1 << 63) else value


def lock_instance(conn: Connection, uid_hash: str, *, wait: bool = True) -> bool:
    """Take the instance lock for the rest of ``conn``'s transaction; False if busy and not ``wait``."""
    if conn.dialect.name != "postgresql":
        return True  # SQLite: this transaction began with BEGIN IMMEDIATE and holds the write lock
    if wait:
        conn.execute(_LOCK, {"k": _lock_key(uid_hash)})
        return True
    return bool(conn.execute(_TRY_LOCK, {"k": _lock_key(uid_hash)}).scalar())


@dataclass(frozen=True)
class Placement:
    """The bytes of one store and where they belong; :meth:`ensure` runs under the instance lock."""

    spool: Spool
    sop_instance_uid: str
    relative_path: str
    chunks: tuple[bytes, ...]
    delivery: Delivery | None = None  # the receipt the file carries (storage/receipt.py)

    @property
    def uid_hash(self) -> str:
        return uid_key(self.sop_instance_uid)

    def ensure(self) -> None:
        """Make sure the file exists (a concurrent remover may have taken it since it was placed)."""
        if self.spool.has(self.relative_path):
            return
        log.info("file of record %s was removed meanwhile; writing it again", self.relative_path)
        self.spool.store(self.chunks, self.sop_instance_uid, self.delivery)


def _named(session: Session, relative_path: str, sop_instance_uid: str | None) -> bool:
    query = select(Instance.id).where(Instance.path == relative_path)
    if sop_instance_uid is not None:  # the unique index finds the only row that could name it
        query = query.where(Instance.sop_instance_uid == sop_instance_uid)
    if session.scalar(query.limit(1)) is not None:
        return True
    # A results directory configured as the spool would share its layout: never remove those.
    return session.scalar(select(Result.id).where(Result.path == relative_path).limit(1)) is not None


def remove_if_unnamed(
    sessions: sessionmaker[Session],
    spool: Spool,
    relative_path: str,
    sop_instance_uid: str | None = None,
) -> bool:
    """Remove the file if no row names it, under the instance lock; True if it was removed."""
    uid_hash = uid_key(sop_instance_uid) if sop_instance_uid else relative_path.rsplit("/", 1)[-1][:64]
    with transaction(sessions, "removing a file no row names") as session:
        lock_instance(session.connection(), uid_hash)
        if _named(session, relative_path, sop_instance_uid):
            return False
        spool.remove(relative_path)
        return True


def remove_orphans(sessions: sessionmaker[Session], spool: Spool) -> int:
    """Remove spool files that no row names (a crash between placing a file and its commit)."""
    with transaction(sessions, "listing files of record") as session:
        named = set(session.scalars(select(Instance.path)))
        named.update(p for p in session.scalars(select(Result.path)) if p is not None)
    removed = 0
    for path in spool.objects.glob("*/*/*.dcm"):
        relative = f"{OBJECTS_DIR}/{path.relative_to(spool.objects).as_posix()}"
        if relative in named or not _FILE_NAME.fullmatch(path.name):
            continue  # named, or not a name the spool makes (not ours to remove)
        if remove_if_unnamed(sessions, spool, relative):
            removed += 1
    if removed:
        log.warning("removed %d spool files that no instance names (left by an interrupted store)", removed)
    return removed
