"""The loop of a worker or a dispatcher: do the next piece of work, or wait, until told to stop.

A step that raises never ends the loop: the database being away pauses it briefly; any other
error is logged with its traceback (an ERROR, for the operator) and the loop starts again after a
pause, so one bad row or one broken destination cannot starve the rest.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from storage.errors import StorageUnavailable

log = logging.getLogger(__name__)

UNAVAILABLE_PAUSE_SECONDS = 2.0
CRASH_PAUSE_SECONDS = 5.0


def run_until_stopped(
    stop: threading.Event,
    step: Callable[[], bool],
    *,
    idle_seconds: float,
    who: str,
    crash_pause_seconds: float = CRASH_PAUSE_SECONDS,
) -> int:
    """Call ``step`` until ``stop`` is set: again at once when it did work (True), after
    ``idle_seconds`` when there was none, after a pause while the database is unavailable or
    after the step crashed. Returns how many times the loop restarted after a crash.
    """
    restarts = 0
    while not stop.is_set():
        try:
            busy = step()
        except StorageUnavailable as exc:
            log.warning("%s: %s; trying again in %.0f s", who, exc, UNAVAILABLE_PAUSE_SECONDS)
            stop.wait(UNAVAILABLE_PAUSE_SECONDS)
            continue
        except Exception:  # the loop's boundary: report, pause, go on
            restarts += 1
            log.exception(
                "%s: crashed (restart %d); starting again in %.0f s", who, restarts, crash_pause_seconds
            )
            stop.wait(crash_pause_seconds)
            continue
        if not busy:
            stop.wait(idle_seconds)
    return restarts
