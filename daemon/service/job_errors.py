"""The worker boundary's one question: is a job's failure worth another attempt?

Only what may pass by itself is **transient** (retried with backoff): the database or the spool
unavailable, a disk full, a file missing on this host, memory or a GPU exhausted or busy, and the
pipeline's own :class:`~pipeline.errors.TransientError`. Everything else is **permanent** on the
first occurrence: the pipeline's :class:`~pipeline.errors.PermanentError`, and any other exception,
from our code or a third party's (highdicom, MONAI, pydicom, numpy, torch), because the same input
raises it again; retrying it five times only delays the answer.

A failure is recorded as one line an operator can act on, then the traceback (``jobs show``).
"""

from __future__ import annotations

import re
import traceback
from dataclasses import dataclass

from pipeline.errors import PermanentError, TransientError
from storage.errors import StorageError

MAX_TRACEBACK_CHARS = 1500
_MISSING_ATTRIBUTE = re.compile(r"has no attribute '([A-Za-z][A-Za-z0-9]*)'")
_RESOURCE_WORDS = ("out of memory", "cuda", "cudnn", "cublas", "device-side", "nccl")


@dataclass(frozen=True, kw_only=True)
class JobFailure:
    """How a job failed: ``reason`` is one line for operators; ``detail`` adds the traceback."""

    permanent: bool
    reason: str
    detail: str


def classify(error: BaseException, *, pipeline: str) -> JobFailure:
    """Transient or permanent, with a one-line reason (see the module docstring)."""
    permanent = _is_permanent(error)
    reason = _reason(error, pipeline=pipeline, permanent=permanent)
    if isinstance(error, PermanentError | TransientError | StorageError):
        return JobFailure(permanent=permanent, reason=reason, detail=reason)
    return JobFailure(permanent=permanent, reason=reason, detail=f"{reason}\n\n{_traceback(error)}")


def _traceback(error: BaseException) -> str:
    """The traceback's header and its innermost frames, within :data:`MAX_TRACEBACK_CHARS`."""
    parts = traceback.format_exception(error)
    head, kept, size = parts[0], [], len(parts[0])
    for part in reversed(parts[1:]):
        if size + len(part) > MAX_TRACEBACK_CHARS:
            kept.append("  ...\n")
            break
        kept.append(part)
        size += len(part)
    return head + "".join(reversed(kept))


def _is_permanent(error: BaseException) -> bool:
    if isinstance(error, PermanentError):
        return True
    if isinstance(error, TransientError | StorageError | OSError | MemoryError | TimeoutError):
        return False
    # torch.cuda.OutOfMemoryError is a RuntimeError; so are CUDA/cuDNN device failures.
    text = f"{type(error).__name__} {error}".lower()
    return not (isinstance(error, RuntimeError) and any(word in text for word in _RESOURCE_WORDS))


def _origin(error: BaseException) -> str:
    """The installed package our code called when ``error`` was raised (highdicom, monai...), or ''."""
    for frame in traceback.extract_tb(error.__traceback__):
        path = frame.filename.replace("\\", "/")
        for marker in ("/site-packages/", "/dist-packages/"):
            if marker in path:
                return path.split(marker, 1)[1].split("/", 1)[0]
    return ""


def _reason(error: BaseException, *, pipeline: str, permanent: bool) -> str:
    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, PermanentError | TransientError | StorageError):
        return f"{type(error).__name__}: {message}"
    if isinstance(error, MemoryError | OSError) or not permanent:
        return f"{type(error).__name__}: {message} (a resource problem; the job is retried)"
    origin = _origin(error)
    where = f" in {origin}" if origin else ""
    missing = _MISSING_ATTRIBUTE.search(message) if isinstance(error, AttributeError) else None
    if missing:
        return (
            f"the input cannot be processed by pipeline {pipeline!r}: DICOM attribute "
            f"{missing.group(1)} is missing or empty ({type(error).__name__}{where}: {message})"
        )
    return (
        f"the input cannot be processed by pipeline {pipeline!r} ({type(error).__name__}{where}: "
        f"{message}); the same study fails again, so it is not retried"
    )
