"""Heartbeats of this process's components into the database (``storage/heartbeats.py``).

A beat is a small write, so it is throttled to one per ``interval`` per component; a database that
cannot take it is logged once per outage and otherwise ignored (the component goes on working, and
``/readyz`` reports it silent, which is the truth as far as anyone else can see).
"""

from __future__ import annotations

import logging
import time

from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Config
from storage import heartbeats
from storage.errors import StorageError
from storage.heartbeats import Component
from storage.models import utcnow

log = logging.getLogger(__name__)

BEAT_SECONDS = 5.0  # at most; a third of http.heartbeat_stale_seconds when that is shorter


def beat_interval(config: Config) -> float:
    """How often to beat so that a live component never looks stale to ``/readyz``."""
    return min(BEAT_SECONDS, config.http.heartbeat_stale_seconds / 3)


class Beacon:
    """Beats for one named component."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        component: Component,
        name: str,
        *,
        interval: float = BEAT_SECONDS,
    ) -> None:
        self.sessions = sessions
        self.component = component
        self.name = name
        self.interval = interval
        self.started_at = utcnow()
        self._last = float("-inf")
        self._failing = False

    def beat(self, *, busy: bool = False, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        try:
            heartbeats.beat(
                self.sessions, self.component, self.name, now=utcnow(), busy=busy, started_at=self.started_at
            )
        except StorageError as exc:
            if not self._failing:
                log.warning("%s: heartbeat not recorded (%s); readiness will show it silent", self.name, exc)
            self._failing = True
            return
        self._failing = False
        self._last = now

    def forget(self) -> None:
        """Stopped cleanly: remove the row so that nobody waits for this component."""
        try:
            heartbeats.forget(self.sessions, self.name)
        except StorageError as exc:
            log.warning("%s: heartbeat row not removed (%s); it ages out", self.name, exc)
