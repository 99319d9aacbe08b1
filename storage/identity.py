"""One patient per study: what contradicts the identity stored for a study, and its audit row.

A patient is a Patient ID qualified by its Issuer of Patient ID (PS3.3 C.7.1.1); a study
belongs to one patient (PS3.3 7.1). The receiver refuses an instance that contradicts its
stored study (storage/ingest.py raises :class:`~storage.errors.IdentityConflict`, the DICOM
side answers 0xC001) and records the refusal here, for ``pacs-triage status``.
"""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from storage.db import transaction
from storage.errors import IdentityConflict
from storage.events import add_event

IDENTITY_CONFLICT_EVENT = "identity_conflict"  # audit kind of a refused instance (storage/stats.py)

Patient = tuple[str | None, str | None]  # (Patient ID, Issuer of Patient ID)


def patient_conflict(stored: Patient, incoming: Patient) -> str | None:
    """Why ``incoming`` is another patient than ``stored``, or None.

    What one side does not state (an empty Patient ID, no issuer) is not a contradiction.
    """
    (patient_id, issuer), (new_id, new_issuer) = stored, incoming
    if patient_id and new_id and patient_id != new_id:
        return "Patient ID differs from the study's"
    if issuer and new_issuer and issuer != new_issuer:
        return "Issuer of Patient ID differs from the study's"
    return None


def record_conflict(sessions: sessionmaker[Session], exc: IdentityConflict, **detail: str) -> None:
    """The refusal's audit row, in its own transaction (the store's was rolled back)."""
    with transaction(sessions, "recording an identity conflict") as session:
        add_event(session, "study", exc.study_id, IDENTITY_CONFLICT_EVENT, reason=str(exc), **detail)
