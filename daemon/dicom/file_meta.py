"""The Part 10 header (preamble, "DICM", File Meta Information) written before a received data set.

The receiver stores ``header + data set bytes as received``. The header holds what PS3.10 7.1
requires, in Explicit VR Little Endian: group length, version, Media Storage SOP Class/Instance
UID (from the C-STORE request), Transfer Syntax UID (from the presentation context) and
pynetdicom's Implementation Class UID / Version Name.

These are the same bytes pydicom's ``write_file_meta_info(fp, event.file_meta,
enforce_standard=True)`` produces (tested against it), built directly: building the
``FileMetaDataset`` and encoding it through pydicom cost about a tenth of the receiver's CPU per
instance. Callers pass UIDs that ``daemon.dicom.validation`` has already checked (ASCII, <= 64 chars).
"""

from __future__ import annotations

import struct

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

PREAMBLE = b"\x00" * 128 + b"DICM"


def _short(element: int, vr: bytes, value: bytes) -> bytes:
    """An element of group 0002 with a 2-byte length (UL, UI, SH), Explicit VR Little Endian."""
    return struct.pack("<HH", 0x0002, element) + vr + struct.pack("<H", len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw  # UI is padded with NULL to an even length


def _text(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b" " if len(raw) % 2 else raw  # SH is padded with a space


# (0002,0001) File Meta Information Version: OB, 4-byte length after 2 reserved bytes.
_VERSION = struct.pack("<HH", 0x0002, 0x0001) + b"OB\x00\x00" + struct.pack("<I", 2) + b"\x00\x01"
_IMPLEMENTATION = _short(0x0012, b"UI", _uid(str(PYNETDICOM_IMPLEMENTATION_UID))) + _short(
    0x0013, b"SH", _text(PYNETDICOM_IMPLEMENTATION_VERSION)
)


def file_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, prefix and File Meta Information for one received data set."""
    body = b"".join(
        (
            _VERSION,
            _short(0x0002, b"UI", _uid(sop_class_uid)),
            _short(0x0003, b"UI", _uid(sop_instance_uid)),
            _short(0x0010, b"UI", _uid(transfer_syntax_uid)),
            _IMPLEMENTATION,
        )
    )
    return PREAMBLE + _short(0x0000, b"UL", struct.pack("<I", len(body))) + body
