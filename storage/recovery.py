"""Rebuild the index rows a power cut took, from the files of record (issue 15).

The receiver acknowledges an instance once its file (with its receipt, storage/receipt.py) is
flushed; its rows are committed without a flush (storage/ingest.py). After a power cut the last
commits may be gone while their files are not. At start, before anything reads the spool or
the receiver listens, :func:`recover_index` looks at every file no row names:

- a complete file with a receipt (its hash checked against the receipt) is recorded again, the
  way the receiver records an instance (``storage.recording.record_in``: study, series and
  instance rows, the association row, reopening a completed study, replacing an older version,
  refusing an identity conflict), with the association and receipt time from its receipt, oldest
  receipt first, in flushed transactions. A ``series`` audit row ``instances_recovered`` says how
  many instances of the series came back this way;
- unless a row says the file is older news: the instance's row holds a receipt at least as
  recent and its file is there (the file is a version superseded before the cut, whose removal
  the cut interrupted; a row whose file is gone was itself superseded by a lost commit),
  or its study was purged after the file's receipt (retention removes the rows first, then the
  files: storage/retention.py). Those files are removed, as is anything else (no receipt:
  written before receipts, or a results file; torn; not a name the spool makes): what
  ``remove_orphans`` always removed;
- a complete receipted file that no longer passes the receiver's validation (stricter rules after
  an upgrade) may hold an acknowledged instance: it is moved to ``spool/quarantine/`` and logged,
  never removed.

A file placed by a store that crashed before its commit (never acknowledged) cannot be told from
one whose commit the power cut took: it is recorded too. The peer, which saw no success, sends
it again and gets a duplicate. Nothing acknowledged is lost; nothing is recorded that did not
arrive complete and pass validation.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from storage.db import transaction
from storage.errors import IdentityConflict
from storage.events import add_event
from storage.file_records import Placement, lock_instance, remove_if_unnamed, remove_orphans
from storage.identity import record_conflict
from storage.models import Instance, Result, Study
from storage.receipt import Content, Delivery, read_content
from storage.recording import IncomingInstance, StoreOutcome, record_in
from storage.slots import fsync_dir
from storage.spool import OBJECTS_DIR, Spool

log = logging.getLogger(__name__)

RECOVERED_EVENT = "instances_recovered"  # series audit row: instances whose rows were rebuilt

# Reads the identifying attributes of a stored file (the receiver's own validation, applied
# again); raises ValueError when the file does not pass it. Supplied by the daemon, which owns
# DICOM parsing (daemon.dicom.stored.describe_stored).
Describe = Callable[[bytes], IncomingInstance]


@dataclass(frozen=True)
class Recovery:
    """What a start-up recovery did."""

    recorded: int  # instances recorded again from their files
    refused: int  # files with a receipt that the receiver's rules refuse now (conflict, invalid)
    removed: int  # files no row names and none could (never acknowledged, superseded, purged)


class _Vanished(Exception):
    """The file was removed before its rows could be recorded (by whoever may remove it)."""


@dataclass(frozen=True)
class _Existing(Placement):
    """A file already in place: recorded as it is, never written again."""

    def ensure(self) -> None:
        if not self.spool.has(self.relative_path):
            raise _Vanished(self.relative_path)


QUARANTINE_DIR = "quarantine"  # under the spool: receipted files recovery could not record again


def _quarantine(spool: Spool, path: Path) -> Path:
    """Move a file of record that no longer passes validation (an upgrade's stricter rules) out of
    ``objects/`` instead of removing it: it may hold an acknowledged instance."""
    target_dir = spool.root / QUARANTINE_DIR
    target_dir.mkdir(exist_ok=True)
    target = target_dir / path.name
    os.replace(path, target)
    fsync_dir(target_dir)
    fsync_dir(path.parent)
    return target


def recover_index(sessions: sessionmaker[Session], spool: Spool, describe: Describe) -> Recovery:
    """Record again the files whose rows were lost, then remove what no row names (see above)."""
    with transaction(sessions, "listing files of record") as session:
        named = set(session.scalars(select(Instance.path)))
        named.update(p for p in session.scalars(select(Result.path)) if p is not None)
    found: list[tuple[dt.datetime, str, Content, IncomingInstance]] = []
    refused = 0
    for path in spool.objects.glob("*/*/*.dcm"):
        relative = f"{OBJECTS_DIR}/{path.relative_to(spool.objects).as_posix()}"
        if relative in named:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        content = read_content(data)
        if content is None or content.receipt is None:
            continue  # removed below, as it always was
        if spool.relative_path_for(content.sop_instance_uid, content.sha256) != relative:
            continue  # not where the spool puts these bytes: not one of its files of record
        try:
            incoming = describe(data)
        except ValueError as exc:  # complete and receipted, so perhaps acknowledged: kept, set aside
            refused += 1
            kept = _quarantine(spool, path)
            log.warning(
                "not recording %s again: %s; the file is kept as %s for a person to look at",
                relative,
                exc,
                kept,
            )
            continue
        found.append((content.receipt.delivery.received_at, relative, content, incoming))
    found.sort(key=lambda item: (item[0], item[1]))
    recorded: Counter[int] = Counter()
    for _, relative, content, incoming in found:
        assert content.receipt is not None
        delivery = content.receipt.delivery
        placement = _Existing(spool, incoming.sop_instance_uid, relative, ())
        try:
            with transaction(sessions, "recording an instance again from its file") as session:
                lock_instance(session.connection(), placement.uid_hash)
                if _older_than_its_rows(session, spool, incoming, delivery):
                    continue  # removed below
                result = record_in(
                    session,
                    incoming,
                    placement,
                    content.size_bytes,
                    content.sha256,
                    delivery.association,
                    delivery.received_at,
                )
        except _Vanished:
            continue
        except IdentityConflict as exc:
            refused += 1
            log.warning("not recording %s again: %s", relative, exc)
            record_conflict(
                sessions,
                exc,
                sop_instance_uid=incoming.sop_instance_uid,
                calling_ae=delivery.association.calling_ae,
                association_id=delivery.association.id,
                recovered="true",
            )
            continue
        if result.outcome is not StoreOutcome.DUPLICATE:
            recorded[result.series_id] += 1
        if result.old_path is not None and result.old_path != relative:
            remove_if_unnamed(sessions, spool, result.old_path, incoming.sop_instance_uid)
    if recorded:
        with transaction(sessions, "recording the recovery") as session:
            for series_id, count in sorted(recorded.items()):
                add_event(session, "series", series_id, RECOVERED_EVENT, count=count)
        log.warning(
            "recorded %d instances again from their files (index rows lost, e.g. by a power cut)",
            sum(recorded.values()),
        )
    removed = remove_orphans(sessions, spool)
    return Recovery(recorded=sum(recorded.values()), refused=refused, removed=removed)


def _older_than_its_rows(
    session: Session, spool: Spool, incoming: IncomingInstance, delivery: Delivery
) -> bool:
    """Whether the rows already say more recent things than this file's receipt (see above)."""
    row = session.execute(
        select(Instance.received_at, Instance.path).where(
            Instance.sop_instance_uid == incoming.sop_instance_uid
        )
    ).first()
    # A row whose file is gone was superseded by a commit the cut took (the superseded file's
    # removal is flushed, that commit is not): the file in hand is of that commit or later, even
    # when its receipt is earlier (a store reads its receipt time before it takes the lock).
    if row is not None and row.received_at >= delivery.received_at and spool.has(row.path):
        return True
    purged_at = session.scalar(
        select(Study.purged_at).where(Study.study_instance_uid == incoming.study_instance_uid)
    )
    return purged_at is not None and purged_at >= delivery.received_at
