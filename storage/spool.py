"""The spool: received bytes on disk, written so that nothing half-written is ever visible.

Layout under the spool root (all names are server-derived; no peer string becomes a path):

    tmp/                       files being written (never read by anyone else; emptied on start)
    objects/ab/cd/<h>-<c>.dcm  h = sha256(SOP Instance UID), c = sha256 of the
                               content, so a replacement never overwrites the file of record

Two write protocols:

- ``write_pending`` + ``commit`` (results, rare re-writes): temp file -> write -> fsync ->
  rename into objects/ -> fsync the directory (objects/ab and objects/ab/cd made durable the
  first time a process uses them).
- ``store`` (the receiver's hot path, issue 15): ONE flush per instance. Each process keeps a
  pool of empty *slot* files in ``slots/``, created in batches of ``SLOT_BATCH`` whose directory
  entries one fsync of ``slots/`` makes durable. An instance is written into a slot, with its
  receipt (``storage/receipt.py``: the association and receipt time, in the file meta group)
  and ``fdatasync``ed (its bytes and size are now on disk under a durable name), then renamed
  into ``objects/`` without a directory fsync. After a power cut the rename has either happened
  or not (a journaling filesystem: ext4, XFS, btrfs, as the spool requires): the bytes are at
  their final name, or still in the slot, where :meth:`Spool.open` finds them (slots of dead
  processes, or of an earlier boot) and moves them into place before anything reads the spool.
  Its index rows are committed without a flush; ``storage.recovery`` rebuilds lost ones from
  the receipts at the next start. A slot torn by a crash in the middle of its write (never
  acknowledged) fails its receipt's hash and is removed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from storage.errors import SpoolUnavailable
from storage.receipt import Delivery, Receipt, digest, read_content, seal, sealable
from storage.slots import HOST, SlotPool, fsync_dir, is_abandoned

log = logging.getLogger(__name__)

TMP_DIR = "tmp"
SLOTS_DIR = "slots"
OBJECTS_DIR = "objects"
_OBJECT_PATH = re.compile(rf"{OBJECTS_DIR}/[0-9a-f]{{2}}/[0-9a-f]{{2}}/[0-9a-f]{{64}}-[0-9a-f]{{64}}\.dcm")


@dataclass(frozen=True)
class PendingFile:
    """Bytes written and fsynced to a private temp file, not yet visible in the spool."""

    tmp_path: Path
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class StoredFile:
    """A file of record in the spool (``relative_path`` is what the database keeps)."""

    relative_path: str
    size_bytes: int
    sha256: str


def uid_key(uid: str) -> str:
    """Server-side name for a (validated) UID: its sha256 in hex."""
    return hashlib.sha256(uid.encode("ascii")).hexdigest()


class Spool:
    """Durable file store rooted at ``root``; refuses writes below ``min_free_bytes`` of free space."""

    def __init__(self, root: Path, *, min_free_bytes: int = 0) -> None:
        self.root = root.resolve()
        self.min_free_bytes = min_free_bytes
        self.tmp = self.root / TMP_DIR
        self.objects = self.root / OBJECTS_DIR
        self.slots = self.root / SLOTS_DIR
        self._root = str(self.root)
        self._slots = SlotPool(self.slots)  # this process's empty, durably named slot files
        # objects/ab and objects/ab/cd directories known to exist durably (see _make_durable_dir).
        self._durable_l1 = bytearray(256)
        self._durable_l2 = bytearray(65536)

    def open(self) -> None:
        """Create the layout and remove temp files left by crashed writers (never acknowledged).

        Several receivers may share one spool, so only files of dead processes of this host, and
        files older than ``STALE_TMP_SECONDS``, are removed.
        """
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.objects.mkdir(parents=True, exist_ok=True)
        self.slots.mkdir(parents=True, exist_ok=True)
        fsync_dir(self.root)  # so that tmp/, objects/ and slots/ themselves survive a crash
        self._make_top_dirs()
        removed = 0
        for leftover in self.tmp.iterdir():
            if is_abandoned(leftover):
                leftover.unlink(missing_ok=True)
                removed += 1
        if removed:
            log.warning("removed %d unacknowledged temp files from %s", removed, self.tmp)
        self.recover_slots()

    def recover_slots(self) -> int:
        """Move the instances left in slots of dead processes to their place; returns how many.

        Empty slots are removed, and so is a slot that does not hold a complete instance (no file
        meta group naming a SOP Instance UID, or content that fails its receipt's hash): it was
        being written when its process died, and was never acknowledged.
        """
        moved = 0
        for slot in self.slots.iterdir():
            if not is_abandoned(slot):
                continue
            data = slot.read_bytes()
            content = read_content(data) if data else None
            if content is None:
                if data:
                    log.warning("removed a torn slot %s (never acknowledged)", slot.name)
                slot.unlink(missing_ok=True)
                continue
            rel = self.relative_path_for(content.sop_instance_uid, content.sha256)
            if self.has(rel):
                slot.unlink(missing_ok=True)
                continue
            self._make_durable_dir(rel)
            os.replace(slot, os.path.join(self._root, rel))
            fsync_dir(os.path.dirname(os.path.join(self._root, rel)))
            moved += 1
        if moved:
            fsync_dir(self.slots)
            log.warning("moved %d instances left in slots by an interrupted receiver into place", moved)
        return moved

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_space(self, incoming: int = 0) -> None:
        """Raise :class:`SpoolUnavailable` if storing ``incoming`` bytes would cross the threshold."""
        try:
            free = self.free_bytes()
        except OSError as exc:
            raise SpoolUnavailable(f"cannot read free space of {self.root}: {exc}") from exc
        if free - incoming < self.min_free_bytes:
            raise SpoolUnavailable(  # the gist first: the peer sees 64 characters of it
                f"spool full: {free} bytes free, {incoming} more would go below "
                f"storage.min_free_bytes = {self.min_free_bytes} in {self.root}"
            )

    def write_pending(self, chunks: list[bytes] | tuple[bytes, ...]) -> PendingFile:
        """Write ``chunks`` to a fresh temp file and fsync it; hash while writing."""
        total = sum(len(c) for c in chunks)
        self.check_space(total)
        tmp_path = self.tmp / f"{HOST}.{os.getpid()}.{uuid.uuid4().hex}.part"
        hasher = hashlib.sha256()
        try:
            fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        written = os.write(fd, view)
                        view = view[written:]
                    hasher.update(chunk)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            tmp_path.unlink(missing_ok=True)
            raise _spool_error(exc, f"writing {tmp_path.name}") from exc
        return PendingFile(tmp_path=tmp_path, size_bytes=total, sha256=hasher.hexdigest())

    def store(
        self, chunks: Sequence[bytes], sop_instance_uid: str, delivery: Delivery | None = None
    ) -> tuple[StoredFile, bool]:
        """Put ``chunks`` at their file of record durably with one flush; (file, newly written).

        The hot path of the receiver (see the module docstring). With ``delivery`` the file
        carries its receipt when ``chunks`` can (``storage.receipt.sealable``); the hash, size
        and name are those of ``chunks`` either way, and identical bytes already in place are
        not written again.
        """
        sha, total = digest(chunks)
        rel = self.relative_path_for(sop_instance_uid, sha)
        stored = StoredFile(relative_path=rel, size_bytes=total, sha256=sha)
        if self.has(rel):
            return stored, False
        if delivery is not None and sealable(chunks):
            chunks = seal(chunks, Receipt(delivery, sha, total))
        self.check_space(total)
        slot = self._slots.take()
        try:
            try:
                fd = os.open(slot, os.O_WRONLY)
            except FileNotFoundError:
                # Another host's start removed this process's idle spares as stale (storage/slots.py
                # is_abandoned: another host's slots are judged by age): make new ones.
                self._slots.drop_spares()
                slot = self._slots.take()
                fd = os.open(slot, os.O_WRONLY)
            try:
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
                os.fdatasync(fd)  # the one flush: bytes and size, under the slot's durable name
            finally:
                os.close(fd)
            self._move_into_place(slot, rel)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(slot)
            raise _spool_error(exc, "writing an instance") from exc
        return stored, True

    def _move_into_place(self, slot: str, rel: str) -> None:
        """Rename a flushed slot to ``rel``: no fsync (see the module docstring)."""
        final = os.path.join(self._root, rel)
        try:
            os.replace(slot, final)
            return
        except FileNotFoundError:
            pass  # objects/ab/cd does not exist yet
        for attempt in range(2):
            try:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(os.path.dirname(os.path.dirname(final)))
                with contextlib.suppress(FileExistsError):
                    os.mkdir(os.path.dirname(final))
                break
            except OSError as exc:
                if attempt or exc.errno not in (errno.ENOSPC, errno.EDQUOT) or not self._slots.drop_spares():
                    raise
        os.replace(slot, final)

    def relative_path_for(self, sop_instance_uid: str, sha256: str) -> str:
        key = uid_key(sop_instance_uid)
        return f"{OBJECTS_DIR}/{key[:2]}/{key[2:4]}/{key}-{sha256}.dcm"

    def commit(self, pending: PendingFile, sop_instance_uid: str) -> StoredFile:
        """Rename the temp file into its final place and fsync the directory."""
        rel = self.relative_path_for(sop_instance_uid, pending.sha256)
        final = os.path.join(self._root, rel)  # strings, not Paths: this runs once per instance
        directory = os.path.dirname(final)
        try:
            self._make_durable_dir(rel)
            try:
                os.replace(pending.tmp_path, final)
            except FileNotFoundError:
                # The directory was removed behind our back (not the temp file: that is ours).
                self._forget_dir(rel)
                self._make_durable_dir(rel)
                os.replace(pending.tmp_path, final)
            fsync_dir(directory)
        except OSError as exc:
            pending.tmp_path.unlink(missing_ok=True)
            raise _spool_error(exc, f"moving {pending.tmp_path.name} into place") from exc
        return StoredFile(relative_path=rel, size_bytes=pending.size_bytes, sha256=pending.sha256)

    def _make_durable_dir(self, rel: str) -> None:
        """Make sure the directory of ``rel`` (``objects/ab/cd``) and its entries are on disk.

        A rename is durable only if the directory holding it stays reachable after a crash, so
        the parent of each level is fsynced, whether this process created the level or another
        receiver did a moment ago (it may not have fsynced yet). That is done once per
        directory per process, remembered in two bitmaps (256 and 65,536 bytes).
        """
        first, second = _dir_indexes(rel)
        if self._durable_l2[second]:
            return
        top = os.path.join(self._root, rel[: len(OBJECTS_DIR) + 3])
        if not self._durable_l1[first]:
            self.objects.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):  # made before, or by another receiver
                os.mkdir(top)
            fsync_dir(self.objects)
            self._durable_l1[first] = 1
        with contextlib.suppress(FileExistsError):
            os.mkdir(os.path.join(self._root, rel[: len(OBJECTS_DIR) + 6]))
        fsync_dir(top)
        self._durable_l2[second] = 1

    def _make_top_dirs(self) -> None:
        """Create ``objects/00`` .. ``objects/ff`` now, made durable by one fsync of ``objects``.

        Then storing into a fresh spool costs one extra fsync for a new ``objects/ab/cd``, not
        two. Best effort: a level that cannot be made now (disk full) is made on first use.
        """
        made = []
        for first in range(256):
            try:
                os.mkdir(os.path.join(self.objects, f"{first:02x}"))
            except FileExistsError:
                pass
            except OSError:
                continue
            made.append(first)
        if made:
            fsync_dir(self.objects)
            for first in made:
                self._durable_l1[first] = 1

    def _forget_dir(self, rel: str) -> None:
        first, second = _dir_indexes(rel)
        self._durable_l1[first] = self._durable_l2[second] = 0

    def has(self, relative_path: str) -> bool:
        """Whether a file of record exists at ``relative_path`` (as built by relative_path_for)."""
        if _OBJECT_PATH.fullmatch(relative_path):
            return os.path.exists(os.path.join(self._root, relative_path))
        return self.path_of(relative_path).exists()

    def discard(self, pending: PendingFile) -> None:
        pending.tmp_path.unlink(missing_ok=True)

    def remove(self, relative_path: str) -> None:
        """Remove a file of record (after its row was committed away, or to undo a failed record)."""
        path = self.path_of(relative_path)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            fsync_dir(path.parent)

    def path_of(self, relative_path: str) -> Path:
        if _OBJECT_PATH.fullmatch(relative_path):
            # The shape relative_path_for builds: only hex names below objects/, no "..".
            return self.root / relative_path
        path = (self.root / relative_path).resolve()
        if not path.is_relative_to(self.objects):
            raise ValueError(f"{relative_path!r} is not inside the spool's objects directory")
        return path


def _dir_indexes(rel: str) -> tuple[int, int]:
    """``objects/ab/cd/...`` -> (0xab, 0xabcd): where the directories are in the bitmaps."""
    n = len(OBJECTS_DIR)
    return int(rel[n + 1 : n + 3], 16), int(rel[n + 1 : n + 3] + rel[n + 4 : n + 6], 16)


def _spool_error(exc: OSError, what: str) -> SpoolUnavailable:
    reason = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or str(exc))
    # The reason first: the peer sees only the first 64 characters (ErrorComment is LO).
    return SpoolUnavailable(f"{reason} in the spool while {what}")
