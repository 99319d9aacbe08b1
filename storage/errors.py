"""Errors of the storage layer. Callers never see driver exceptions (sqlite3, psycopg, OSError).

StorageError
├── StorageUnavailable     the database or the disk cannot take writes now: try again later
│   ├── DatabaseUnavailable   connection refused, server restarting, locked past the busy timeout
│   └── SpoolUnavailable      disk full, free space under the threshold, I/O error
├── IntegrityProblem       the request contradicts what is stored (a programming or data error)
│   └── IdentityConflict      another patient for a stored study, a series or instance UID reused elsewhere
├── NotFound               no job, delivery or study with that id or UID
└── InvalidTransition      a state change the row's current state does not allow
"""

from __future__ import annotations


class StorageError(Exception):
    """Base class for every error raised by ``storage``."""


class StorageUnavailable(StorageError):
    """Storage cannot accept writes right now; nothing was recorded. Retrying later may succeed."""


class DatabaseUnavailable(StorageUnavailable):
    """The database refused or lost the connection, or stayed locked past the busy timeout."""


class SpoolUnavailable(StorageUnavailable):
    """The spool's disk is full, under the configured free-space threshold, or failing."""


class IntegrityProblem(StorageError):
    """A write contradicts the stored state in a way retrying cannot fix."""


class IdentityConflict(IntegrityProblem):
    """An instance contradicts the identity stored for its study or series: refused, never merged.

    One patient per study (PS3.3 7.1, the Study IE belongs to one Patient IE); a series belongs to
    one study and an instance to one series (PS3.3 C.7.3.1, C.12.1: UIDs are unique). ``study_id``
    is the stored study the conflict was found against, for its audit event.
    """

    def __init__(self, message: str, *, study_id: int) -> None:
        super().__init__(message)
        self.study_id = study_id


class NotFound(StorageError):
    """The job, delivery or study named does not exist; list them with ``pacs-triage jobs list``."""


class InvalidTransition(StorageError):
    """The requested state change is not allowed from the row's current state (the message says which are)."""
