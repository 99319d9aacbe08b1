"""Errors of the pipeline, split by what the caller should do about them.

    PipelineError
    ├── PermanentError        re-running the same input gives the same failure: fail the job, no retry
    │   ├── NoUsableSeries    no series of the study satisfies the pipeline's selection rules
    │   ├── GeometryError     the chosen series cannot be turned into a trustworthy volume
    │   └── BundleError       a bundle is missing, unpinned, altered or malformed
    └── TransientError        may succeed later (out of memory, device busy): retry with backoff

Messages name the series/instance UID and the rule that failed, so an operator can act on them.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base class for every error raised by ``pipeline``."""


class PermanentError(PipelineError):
    """The input itself is unusable; the same input will always fail the same way."""


class NoUsableSeries(PermanentError):
    """No series in the study qualifies for the pipeline."""


class GeometryError(PermanentError):
    """The series' geometry is inconsistent or unsupported (gaps, tilt, mixed orientation...)."""


class BundleError(PermanentError):
    """A model bundle could not be loaded safely (missing file, sha256 mismatch, bad config)."""


class TransientError(PipelineError):
    """A failure that may not repeat (resources, device); the job should be retried."""
