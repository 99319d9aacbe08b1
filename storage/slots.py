"""Slots: empty files whose names are already on disk, for the spool's one-flush write (issue 15).

Each receiver process keeps a pool of them in ``<spool>/slots/``, named
``<host>.<pid>.<boot>-<random>.slot`` and created ``SLOT_BATCH`` at a time, made durable by one
fsync of the directory. ``<boot>`` is the kernel's boot id: after a power cut the process that
wrote a slot is gone even if its pid now belongs to another process (or to the new receiver).
``storage.spool.Spool.store`` writes an instance into a slot, flushes it and renames it into place;
``Spool.recover_slots`` handles the slots of processes that died.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import time
import uuid
from pathlib import Path

SLOT_BATCH = 32  # empty slot files made at once: one directory fsync for this many instances
STALE_TMP_SECONDS = 3600
HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64] or "host"


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return re.sub(r"[^0-9a-f]", "", f.read())[:16] or "0"
    except OSError:
        return "0"  # not Linux: a slot of a dead pid is still found; a reused pid keeps its slots


BOOT = _boot_id()


class SlotPool:
    """This process's empty slots in ``directory``; thread-safe."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._free: list[str] = []
        self._pid = os.getpid()  # slots are named after their process: a forked child makes its own
        self._lock = threading.Lock()

    def take(self) -> str:
        """An empty slot of this process whose name is on disk (made in a batch when none is left)."""
        with self._lock:
            if self._pid != os.getpid():
                self._free, self._pid = [], os.getpid()
            if not self._free:
                self._make()
            return self._free.pop()

    def _make(self) -> None:
        """Create up to SLOT_BATCH empty slots, named durably by one fsync of ``slots/``."""
        made = []
        prefix = os.path.join(self.directory, f"{HOST}.{os.getpid()}.")
        try:
            for _ in range(SLOT_BATCH):
                path = f"{prefix}{BOOT}-{uuid.uuid4().hex}.slot"
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
                made.append(path)
        except FileNotFoundError:
            self.directory.mkdir(parents=True, exist_ok=True)  # removed behind our back: next time
            if not made:
                raise
        except OSError:
            if not made:  # out of inodes: refuse this store; any slot made is used first
                raise
        fsync_dir(self.directory)
        self._free.extend(made)

    def drop_spares(self) -> bool:
        """Give the inodes of unused slots back (the disk is full); True if there were any."""
        with self._lock:
            spare, self._free = self._free, []
        for path in spare:
            with contextlib.suppress(OSError):
                os.unlink(path)
        return bool(spare)


def is_abandoned(path: Path) -> bool:
    """Whether the process that made ``path`` (a slot or temp file) is gone."""
    host, _, rest = path.name.partition(".")
    pid_text, _, tail = rest.partition(".")
    if host == HOST and pid_text.isdigit():
        boot = tail.partition("-")[0] if path.suffix == ".slot" and "-" in tail else BOOT
        if boot != BOOT:
            return True  # made before the last reboot
        pid = int(pid_text)
        if pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    try:
        return time.time() - path.stat().st_mtime > STALE_TMP_SECONDS
    except FileNotFoundError:
        return False


def fsync_dir(directory: Path | str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
