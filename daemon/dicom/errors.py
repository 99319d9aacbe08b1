"""Typed errors of the receiver; ``daemon/dicom/status.py`` maps each to one DIMSE status.

ReceiveError
├── InvalidDataset      cannot be parsed, required attributes missing, UIDs invalid   -> C000
│   ├── EncodingMismatch  not encoded as the accepted transfer syntax, trailing bytes -> C000
│   └── InvalidValue      a value its VR forbids (NUL in a string, IS over 32 bits)    -> C000
└── DatasetMismatch     the data set's SOP Class/Instance UID differ from the request -> A900
(storage.errors.StorageUnavailable: disk or database unavailable, disk nearly full    -> A700)
(storage.errors.IdentityConflict: another patient for the study, series in another study -> C001)
"""

from __future__ import annotations


class ReceiveError(Exception):
    """A received instance was refused; the message says why, for the log and the peer's ErrorComment."""


class InvalidDataset(ReceiveError):
    """The data set cannot be parsed, lacks required attributes or carries invalid UIDs."""


class DatasetMismatch(ReceiveError):
    """The data set does not match the C-STORE request (PS3.4 B.2.3: A900)."""


class EncodingMismatch(InvalidDataset):
    """The bytes are not one data set encoded in the accepted context's transfer syntax (PS3.5 7.1, 10)."""


class InvalidValue(InvalidDataset):
    """A recorded attribute holds a value its VR forbids (PS3.5 6.2)."""
