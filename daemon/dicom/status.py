"""The one place where DIMSE status codes are spelled (PS3.4 Annex B.2.3, PS3.7 Annex C).

Everything else raises a typed error and asks this module for the status to send.
"""

from __future__ import annotations

import enum
import logging

from daemon.dicom.errors import DatasetMismatch, InvalidDataset
from storage.errors import IdentityConflict, StorageUnavailable

log = logging.getLogger(__name__)


class StoreStatus(enum.IntEnum):
    """C-STORE response statuses we send (PS3.4 Table B.2-1)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources (disk or database unavailable, disk full)
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # Error: Data Set does not match SOP Class
    CANNOT_UNDERSTAND = 0xC000  # Error: Cannot understand (unparseable, invalid UIDs)
    # Error: Cannot understand, our Cxxx code for "contradicts what is stored" (PS3.4 Table B.2-1
    # leaves xxx to the implementation): another patient's Patient ID (with Issuer) under a stored
    # Study Instance UID (PS3.3 7.1: a study belongs to one patient), a Series Instance UID stored
    # under another study, a SOP Instance UID under another series. Refused, never merged, and
    # audited (``identity_conflict`` in ``pacs-triage status``). Not A7xx: resending cannot help.
    IDENTITY_CONFLICT = 0xC001
    PROCESSING_FAILURE = 0x0110  # Failure: Processing failure (anything unexpected)


class EchoStatus(enum.IntEnum):
    SUCCESS = 0x0000


# Categories of any status we may receive as an SCU (PS3.7 C.1-C.5).
def category(status: int) -> str:
    """Return "success", "warning", "cancel", "pending" or "failure" for a DIMSE status code."""
    if status == 0x0000:
        return "success"
    if status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF:
        return "warning"
    if status == 0xFE00:
        return "cancel"
    if status in (0xFF00, 0xFF01):
        return "pending"
    return "failure"


def refused_for_good(status: int) -> bool:
    """A C-STORE failure that sending the same object again cannot fix (PS3.4 Table B.2-1, PS3.7 C.4):
    A9xx (data set does not match SOP class), Cxxx (cannot understand), 0x0122 (SOP class not
    supported), 0x0124 (not authorized). A7xx (out of resources), 0x0110 (processing failure) and
    anything unknown may pass.
    """
    return 0xA900 <= status <= 0xA9FF or 0xC000 <= status <= 0xCFFF or status in (0x0122, 0x0124)


def status_for(exc: BaseException) -> StoreStatus:
    """Map a typed error to the C-STORE status to send."""
    if isinstance(exc, IdentityConflict):
        return StoreStatus.IDENTITY_CONFLICT
    if isinstance(exc, StorageUnavailable):
        return StoreStatus.OUT_OF_RESOURCES
    if isinstance(exc, DatasetMismatch):
        return StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    if isinstance(exc, InvalidDataset):
        return StoreStatus.CANNOT_UNDERSTAND
    return StoreStatus.PROCESSING_FAILURE
