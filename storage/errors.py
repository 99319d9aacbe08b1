"""Errors of the storage layer. Callers never see driver exceptions (sqlite3, psycopg, OSError).

StorageError
├── StorageUnavailable     the database or the disk cannot take writes now: try again later
│   ├── DatabaseUnavailable   connection refused, server restarting, locked past the busy timeout
│   └── SpoolUnavailable      disk full, free space under the threshold, I/O error
└── IntegrityProblem       the request contradicts what is stored (a programming or data error)
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
