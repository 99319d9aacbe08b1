"""A consistent copy of a SQLite database while the service runs (SQLite's online backup API).

The copy is taken page by page under SQLite's own locking, so writers go on between steps and
the result is a database as of one moment, WAL included; it is written to a temporary file,
fsynced and renamed, so ``target`` is either absent or complete. PostgreSQL is backed up with
``pg_dump`` (README "Backup and restore").
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from storage.errors import StorageError

PAGES_PER_STEP = 1024  # ~4 MiB per step with 4 KiB pages: writers wait at most one step


class BackupError(StorageError):
    """The backup could not be written (the message says where and why)."""


def backup_sqlite(source: Path, target: Path) -> int:
    """Copy the SQLite database ``source`` to ``target`` (not existing yet); its size in bytes."""
    if target.exists():
        raise BackupError(f"{target} exists: give a new file name (a backup never overwrites)")
    if not target.parent.is_dir():
        raise BackupError(f"directory {target.parent} does not exist")
    partial = target.with_name(target.name + ".partial")
    try:
        src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
        try:
            dst = sqlite3.connect(partial)
            try:
                src.backup(dst, pages=PAGES_PER_STEP)
                dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal beside it
                check = dst.execute("PRAGMA integrity_check").fetchone()[0]
            finally:
                dst.close()
        finally:
            src.close()
        if check != "ok":
            raise BackupError(f"the copy failed its integrity check: {check}")
        with partial.open("rb") as fh:
            os.fsync(fh.fileno())
        partial.rename(target)
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except (sqlite3.Error, OSError) as exc:
        partial.unlink(missing_ok=True)
        raise BackupError(f"backup of {source} to {target} failed: {exc}") from exc
    return target.stat().st_size
