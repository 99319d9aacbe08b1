"""The words every room shares: the triage priority and the DICOM identifiers' syntax.

``pipeline`` and ``storage`` stay independent of each other, yet both speak of a study's priority
(the pipeline finds it, the queue orders jobs by it) and both rely on valid UIDs; so the vocabulary
lives here, below both. It imports nothing of ours and nothing outside the standard library.
"""

from vocabulary.identifiers import (
    MAX_AE_TITLE_LENGTH,
    MAX_UID_LENGTH,
    is_sha256_hex,
    is_valid_uid,
    validate_ae_title,
)
from vocabulary.priority import Priority, PriorityName

__all__ = [
    "MAX_AE_TITLE_LENGTH",
    "MAX_UID_LENGTH",
    "Priority",
    "PriorityName",
    "is_sha256_hex",
    "is_valid_uid",
    "validate_ae_title",
]
