"""Peak resident memory of this process per job: reset the high-water mark, run, read it (Linux).

``/proc/self/clear_refs`` with ``5`` resets the kernel's VmHWM (peak RSS) to the current RSS
(Linux >= 4.0), so a worker measures each job's own peak even after a larger earlier one. Where that
is not available the lifetime peak (``getrusage``) is reported instead, and said so.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PeakRss", "start_peak_rss"]

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


@dataclass(frozen=True)
class PeakRss:
    """A peak resident set size in bytes; ``since_reset`` False: the process's lifetime peak."""

    bytes: int
    since_reset: bool

    @property
    def mib(self) -> float:
        return self.bytes / 2**20


def _vm_hwm() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _lifetime_peak() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kB on Linux


class _Meter:
    def __init__(self) -> None:
        try:
            _CLEAR_REFS.write_text("5")
            self.reset = _vm_hwm() is not None
        except OSError:
            self.reset = False

    def peak(self) -> PeakRss:
        hwm = _vm_hwm() if self.reset else None
        if hwm is None:
            return PeakRss(_lifetime_peak(), since_reset=False)
        return PeakRss(hwm, since_reset=True)


def start_peak_rss() -> _Meter:
    """Reset the peak; ``.peak()`` later returns the peak since (or the lifetime peak, flagged)."""
    return _Meter()
