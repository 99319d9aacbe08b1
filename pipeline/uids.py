"""Deterministic UIDs and the identity of this software in the DICOM objects it writes.

Results carry UIDs derived from their inputs (DESIGN.md, "Exactly once in effect"): the same
input fingerprint run through the same bundle (sha256, version) yields the same Series and SOP
Instance UIDs, so a re-run or a resend is a duplicate that the PACS ignores.

UIDs are UUID-derived, under the ``2.25`` root (PS3.5 B.2, ISO/IEC 9834-8): no organisational root
needs registering. This module is the only place that spells a UID root or our implementation name.
"""

from __future__ import annotations

import enum
import hashlib
import importlib.metadata
from dataclasses import dataclass

from pipeline.findings import AlgorithmInfo, Finding

UUID_DERIVED_ROOT = "2.25"
# Domain separation: our hashes never collide with another tool hashing the same strings.
_NAMESPACE = b"pacs-triage/uid/v1"

PRODUCT_NAME = "pacs-triage"
MANUFACTURER = "pacs-triage project"
# PS3.7 D.3.3.2: Implementation Version Name is at most 16 characters.
IMPLEMENTATION_VERSION_NAME = "PACS_TRIAGE_01"


def _software_version() -> str:
    try:
        return importlib.metadata.version(PRODUCT_NAME)
    except importlib.metadata.PackageNotFoundError:  # running from a source tree, not installed
        return "0+unknown"


SOFTWARE_VERSION = _software_version()


def derive_uid(*parts: str) -> str:
    """Return a ``2.25.<decimal>`` UID that is a pure function of ``parts``.

    The parts are length-prefixed before hashing, so ``("ab", "c")`` and ``("a", "bc")`` differ.
    The first 128 bits of the SHA-256 digest become an RFC 9562 version-8 (custom) UUID, whose
    integer value is the UID's last component (at most 39 digits, so the UID fits 64 characters).
    """
    if not parts:
        raise ValueError("derive_uid needs at least one part")
    digest = hashlib.sha256(_NAMESPACE)
    for part in parts:
        if not isinstance(part, str):
            raise TypeError(f"derive_uid parts must be str, got {type(part).__name__}: {part!r}")
        encoded = part.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "big"))
        digest.update(encoded)
    raw = bytearray(digest.digest()[:16])
    raw[6] = (raw[6] & 0x0F) | 0x80  # version 8
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122/9562 variant
    return f"{UUID_DERIVED_ROOT}.{int.from_bytes(raw, 'big')}"


class ResultSeries(enum.IntEnum):
    """Series Number of each kind of object we create: one table, so no two kinds share a number."""

    SR = 9901  # TID 1500 measurement report
    SEG = 9902  # segmentation
    KEY_IMAGES = 9903  # secondary captures of the lesions
    KOS = 9904  # key object selection
    ECHO_SR = 9905  # the echo pipeline's basic text SR


# Constant UIDs of this software (not of any one result).
IMPLEMENTATION_CLASS_UID = derive_uid(PRODUCT_NAME, "implementation-class")
DEVICE_OBSERVER_UID = derive_uid(PRODUCT_NAME, "device-observer")


@dataclass(frozen=True)
class ResultUids:
    """The Series and SOP Instance UIDs of one result object (SR or SEG)."""

    series_instance_uid: str
    sop_instance_uid: str


def result_uids(input_fingerprint: str, algorithm: AlgorithmInfo, kind: str) -> ResultUids:
    """UIDs of the ``kind`` ("sr", "seg") result for this input and this pinned bundle."""
    if not input_fingerprint:
        raise ValueError("input_fingerprint must be a non-empty string")
    base = (input_fingerprint, algorithm.sha256, algorithm.version, kind)
    return ResultUids(
        series_instance_uid=derive_uid(*base, "series"),
        sop_instance_uid=derive_uid(*base, "instance"),
    )


def tracking_uid(input_fingerprint: str, algorithm: AlgorithmInfo, *key: str) -> str:
    """Tracking Unique Identifier (TID 4108) of one tracked item of a result.

    ``key`` names the item within the result, e.g. ``("finding", "1", "spleen")``; the SR and the
    SEG derive a finding's UID from the same key, so its SR measurement group and SEG segment share it.
    """
    if not key:
        raise ValueError("tracking_uid needs a key naming the tracked item")
    return derive_uid(input_fingerprint, algorithm.sha256, algorithm.version, "tracking", *key)


def finding_tracking_uid(input_fingerprint: str, algorithm: AlgorithmInfo, finding: Finding) -> str:
    """Tracking UID of a lesion: its SR measurement group and its SEG segment carry the same one."""
    return tracking_uid(
        input_fingerprint, algorithm, "finding", str(finding.label), finding.name, str(finding.lesion)
    )


def model_device_uid(algorithm: AlgorithmInfo) -> str:
    """Device UID of a model (IHE AIR Contributing Equipment): new weights, new device."""
    return derive_uid(PRODUCT_NAME, "model-device", algorithm.sha256)
