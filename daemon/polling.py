"""The loop of a worker or a dispatcher: do the next piece of work, or wait, until told to stop."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from storage.errors import StorageUnavailable

log = logging.getLogger(__name__)

UNAVAILABLE_PAUSE_SECONDS = 2.0


def run_until_stopped(
    stop: threading.Event, step: Callable[[], bool], *, idle_seconds: float, who: str
) -> None:
    """Call ``step`` until ``stop`` is set: again at once when it did work (True), after
    ``idle_seconds`` when there was none, after a pause while the database is unavailable.
    """
    while not stop.is_set():
        try:
            busy = step()
        except StorageUnavailable as exc:
            log.warning("%s: %s; trying again in %.0f s", who, exc, UNAVAILABLE_PAUSE_SECONDS)
            stop.wait(UNAVAILABLE_PAUSE_SECONDS)
            continue
        if not busy:
            stop.wait(idle_seconds)
