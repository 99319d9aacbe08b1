"""Syntax of the identifiers that cross every boundary: DICOM UIDs, AE titles, sha256 digests.

One definition each, so that the receiver, the queue and the pipeline accept exactly the same values.
"""

from __future__ import annotations

import re

# PS3.5 9.1: dot-separated numeric components without leading zeros ("0" itself is fine), <= 64 chars.
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
MAX_UID_LENGTH = 64
# PS3.5 6.2: an AE title is at most 16 characters.
MAX_AE_TITLE_LENGTH = 16
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def is_valid_uid(value: object) -> bool:
    """True when ``value`` is a string that is a syntactically valid UID (PS3.5 9.1)."""
    return isinstance(value, str) and 0 < len(value) <= MAX_UID_LENGTH and _UID.fullmatch(value) is not None


def is_sha256_hex(value: str) -> bool:
    """True when ``value`` is a sha256 digest as 64 lower-case hex digits (normalise with ``.strip().lower()``)."""
    return _SHA256_HEX.fullmatch(value) is not None


def validate_ae_title(value: str) -> str:
    """The AE title without padding; ValueError when it is not one (PS3.5 6.2).

    An AE title is 1-16 characters of the default repertoire, without backslash or control characters.
    """
    title = value.strip()
    if not 1 <= len(title) <= MAX_AE_TITLE_LENGTH:
        raise ValueError(f"AE title {value!r} must be 1 to {MAX_AE_TITLE_LENGTH} characters")
    if any(c == "\\" or not (0x20 <= ord(c) < 0x7F) for c in title):
        raise ValueError(f"AE title {value!r} may only contain printable ASCII other than backslash")
    return title
