"""Slots: empty files whose names are already on disk, for the spool's one-flush write (issue 15).

Each receiver process keeps a pool of them in ``<spool>/slots/``, named
``<host>.<pid>.<random>.slot`` and created ``SLOT_BATCH`` at a time, made durable by one fsync of
the directory. ``storage.spool.Spool.store`` writes an instance into a slot, flushes it and
renames it into place; ``Spool.recover_slots`` handles the slots of processes that died.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import struct
import threading
import time
import uuid
from pathlib import Path

SLOT_BATCH = 32  # empty slot files made at once: one directory fsync for this many instances
STALE_TMP_SECONDS = 3600
HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64] or "host"
UID_CHARS = re.compile(r"[0-9.]+")


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
                path = f"{prefix}{uuid.uuid4().hex}.slot"
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
    host, _, rest = path.name.partition(".")
    pid_text = rest.partition(".")[0]
    if host == HOST and pid_text.isdigit():
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


def meta_sop_instance_uid(data: bytes) -> str | None:
    """Media Storage SOP Instance UID (0002,0003) from a Part 10 file's meta group, or None.

    Only what this service writes (``daemon/dicom/file_meta.py``: preamble, DICM, explicit VR
    little endian group 0002) is recognised.
    """
    if data[128:132] != b"DICM":
        return None
    pos = 132
    while pos + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            return None
        vr = data[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            (length,) = struct.unpack_from("<L", data, pos + 8)
            pos += 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            pos += 8
        if element == 0x0003:
            uid = data[pos : pos + length].rstrip(b"\0 ").decode("ascii", "replace")
            return uid if 0 < len(uid) <= 64 and UID_CHARS.fullmatch(uid) else None
        pos += length
    return None


def fsync_dir(directory: Path | str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
