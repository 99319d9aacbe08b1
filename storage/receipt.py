"""The receipt: who delivered an instance and when, inside the instance's own file (issue 15).

The receiver acknowledges after ONE flush per instance (the file's), and commits its index rows
without a flush (storage/db.py ``COMMIT_FLUSH``). After a power cut the rows of the last commits
may be gone; ``storage.recovery`` rebuilds them from the files. A file therefore carries every
fact its rows hold that the data set does not: the association (id, calling and called AE
title, peer address, start) and the receipt time, written by the same flush as the data set.

Where: in the File Meta Information (PS3.10 7.1), the only part of a Part 10 file that is ours;
the data set stays byte for byte as received. A sidecar file would need a flush of its own, and
a trailer after the data set would be read as data set elements by every DICOM reader.

- (0002,0017) Sending / (0002,0018) Receiving Application Entity Title: the calling and called
  AE titles, the standard's own elements for them (informative: written when valid AE values).
- (0002,0100) Private Information Creator UID ``RECEIPT_CREATOR`` and (0002,0102) Private
  Information: the facts as JSON (the source of truth for recovery), with the sha256 and size of
  the instance *without* the receipt elements, so that recovery can tell a complete file from a
  torn one (a power cut in the middle of a write that was never acknowledged).

The sha256 and size of an instance (its file name, ``instances.sha256``, ``size_bytes``, the
study's content fingerprint) are those of the file without the receipt: exactly the bytes the
receiver wrote before receipts existed, so an identical resend from another association, or of
an instance stored before this change, is still a duplicate.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass

PREAMBLE_LENGTH = 132  # 128-byte preamble + "DICM"
RECEIPT_CREATOR = "2.25.28352514242352211585966005465011801523"  # uuid5(URL, "pacs-triage/receipt/v1")
_RECEIPT_ELEMENTS = frozenset({0x0016, 0x0017, 0x0018, 0x0026, 0x0027, 0x0028, 0x0100, 0x0102})
_LONG_VRS = (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UR", b"UC")
_UID_CHARS = frozenset("0123456789.")


@dataclass(frozen=True)
class AssociationInfo:
    """Who delivered an instance (all validated by the caller; none of it reaches a path)."""

    id: str
    calling_ae: str
    called_ae: str
    source_address: str
    started_at: dt.datetime


@dataclass(frozen=True)
class Delivery:
    """One instance's arrival: the association that delivered it and when."""

    association: AssociationInfo
    received_at: dt.datetime


@dataclass(frozen=True)
class Receipt:
    """A delivery and the hash of what was delivered, as written into the file."""

    delivery: Delivery
    sha256: str
    size_bytes: int

    def encode(self) -> bytes:
        a = self.delivery.association
        facts = {
            "v": 1,
            "association_id": a.id,
            "calling_ae": a.calling_ae,
            "called_ae": a.called_ae,
            "source_address": a.source_address,
            "association_started_at": a.started_at.isoformat(),
            "received_at": self.delivery.received_at.isoformat(),
            "sha256": self.sha256,
            "size": self.size_bytes,
        }
        return json.dumps(facts, separators=(",", ":"), ensure_ascii=True).encode("ascii")

    @classmethod
    def decode(cls, raw: bytes) -> Receipt:
        """The receipt in ``raw``; ValueError (or KeyError/TypeError) when it is not one."""
        facts = json.loads(raw.rstrip(b"\0 ").decode("ascii"))
        if facts.get("v") != 1:
            raise ValueError(f"unknown receipt version {facts.get('v')!r}")
        association = AssociationInfo(
            id=str(facts["association_id"]),
            calling_ae=str(facts["calling_ae"]),
            called_ae=str(facts["called_ae"]),
            source_address=str(facts["source_address"]),
            started_at=_utc(facts["association_started_at"]),
        )
        delivery = Delivery(association, _utc(facts["received_at"]))
        return cls(delivery, str(facts["sha256"]), int(facts["size"]))


@dataclass(frozen=True)
class Content:
    """What a spool file holds: its SOP Instance UID, the hash and size without the receipt."""

    sop_instance_uid: str
    sha256: str
    size_bytes: int
    receipt: Receipt | None  # None: a file written without one (results, files before issue 15)


def digest(chunks: Sequence[bytes]) -> tuple[str, int]:
    """sha256 (hex) and size of ``chunks`` joined."""
    h = hashlib.sha256()
    size = 0
    for chunk in chunks:
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


def sealable(chunks: Sequence[bytes]) -> bool:
    """Whether ``chunks`` can carry a receipt: a Part 10 file whose first chunk holds its whole
    meta group, with no element at or after (0002,0016) (what ``daemon.dicom.file_meta`` writes).

    Anything else (a file some other writer made, bytes that are not Part 10) is stored as it is
    and its rows are committed with a flush (storage/ingest.py).
    """
    if not chunks:
        return False
    end = _meta_end(chunks[0])
    if end is None or end > len(chunks[0]):
        return False
    return all(element < 0x0016 for element, _, _, _ in _elements(chunks[0], end))


def seal(chunks: Sequence[bytes], receipt: Receipt) -> tuple[bytes, ...]:
    """``chunks`` (:func:`sealable`) with ``receipt`` in their meta group.

    The receipt elements go at the end of the meta group (their tags are above every element
    there) and the group length grows by their size; the data set chunks pass through untouched.
    """
    if not sealable(chunks):
        raise ValueError("only a Part 10 file with nothing at or after (0002,0016) in its meta group")
    header = chunks[0]
    end = _meta_end(header)
    assert end is not None
    a = receipt.delivery.association
    extra = b"".join(
        (
            _ae_element(0x0017, a.calling_ae),
            _ae_element(0x0018, a.called_ae),
            _element(0x0100, b"UI", _pad(RECEIPT_CREATOR.encode("ascii"), b"\0")),
            _element(0x0102, b"OB", _pad(receipt.encode(), b" ")),
        )
    )
    (group_length,) = struct.unpack_from("<I", header, PREAMBLE_LENGTH + 8)
    sealed = (
        header[: PREAMBLE_LENGTH + 8]
        + struct.pack("<I", group_length + len(extra))
        + header[PREAMBLE_LENGTH + 12 : end]
        + extra
        + header[end:]
    )
    return (sealed, *chunks[1:])


def read_content(data: bytes) -> Content | None:
    """What ``data`` (a whole spool file) holds; None when it is not a complete file of ours.

    With a receipt, the file is complete only if the hash and size of the file without the
    receipt elements are the receipt's: anything else is a torn write (never acknowledged).
    Without one, the hash is of the whole file, as the spool has always named its files.
    """
    end = _meta_end(data)
    if end is None or end > len(data):
        return None
    elements = _elements(data, end)
    uid = next((_text(data, v, n) for e, _, v, n in elements if e == 0x0003), None)
    if uid is None or not 0 < len(uid) <= 64 or not set(uid) <= _UID_CHARS:
        return None
    creator = next((_text(data, v, n) for e, _, v, n in elements if e == 0x0100), None)
    private = next(((v, n) for e, _, v, n in elements if e == 0x0102), None)
    if creator != RECEIPT_CREATOR or private is None:
        sha, size = digest((data,))
        return Content(uid, sha, size, None)
    try:
        receipt = Receipt.decode(data[private[0] : private[0] + private[1]])
    except (ValueError, KeyError, TypeError):
        return None
    body = b"".join(data[start : v + n] for e, start, v, n in elements if e and e not in _RECEIPT_ELEMENTS)
    meta = data[: PREAMBLE_LENGTH + 8] + struct.pack("<I", len(body)) + body
    sha, size = digest((meta, memoryview(data)[end:]))  # type: ignore[arg-type]  # hashlib takes views
    if (sha, size) != (receipt.sha256, receipt.size_bytes):
        return None
    return Content(uid, sha, size, receipt)


def _meta_end(data: bytes) -> int | None:
    """Offset just after the file meta group (from its group length), or None if not Part 10."""
    if len(data) < PREAMBLE_LENGTH + 12 or data[128:132] != b"DICM":
        return None
    if data[PREAMBLE_LENGTH : PREAMBLE_LENGTH + 6] != b"\x02\x00\x00\x00UL":
        return None
    (length,) = struct.unpack_from("<I", data, PREAMBLE_LENGTH + 8)
    return PREAMBLE_LENGTH + 12 + length


def _elements(data: bytes, end: int) -> list[tuple[int, int, int, int]]:
    """(element, start, value offset, value length) of each group 0002 element (Explicit VR LE)."""
    found = []
    pos = PREAMBLE_LENGTH
    while pos + 8 <= end:
        group, element = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        start = pos
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<I", data, pos + 8)
            pos += 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            pos += 8
        found.append((element, start, pos, length))
        pos += length
    return found


def _text(data: bytes, offset: int, length: int) -> str:
    return data[offset : offset + length].rstrip(b"\0 ").decode("ascii", "replace")


def _pad(raw: bytes, pad: bytes) -> bytes:
    return raw + pad if len(raw) % 2 else raw


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr in _LONG_VRS:
        return struct.pack("<HH", 0x0002, element) + vr + b"\0\0" + struct.pack("<I", len(value)) + value
    return struct.pack("<HH", 0x0002, element) + vr + struct.pack("<H", len(value)) + value


def _ae_element(element: int, title: str) -> bytes:
    """An AE element (PS3.5 6.2), or nothing when ``title`` is not a valid AE value."""
    if not 0 < len(title) <= 16 or any(c == "\\" or not 0x20 <= ord(c) < 0x7F for c in title):
        return b""
    return _element(element, b"AE", _pad(title.encode("ascii"), b" "))


def _utc(value: object) -> dt.datetime:
    parsed = dt.datetime.fromisoformat(str(value))
    if parsed.tzinfo is None:
        raise ValueError(f"receipt time {value!r} has no time zone")
    return parsed.astimezone(dt.UTC)
