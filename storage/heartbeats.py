"""Signs of life of the node's components, kept in the database so any process can report them.

Each receiver supervisor, worker, dispatcher and scheduler upserts one ``heartbeats`` row under its
own name every few seconds and removes it when it stops cleanly. A row whose ``beat_at`` is old
belongs to a component that died (``kill -9``, host down) or hung; ``/readyz`` and the dashboard
read these rows, never process memory, so one endpoint shows every process of the node.
"""

from __future__ import annotations

import datetime as dt
import enum
import os
import socket
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from storage.db import transaction, translate_errors
from storage.models import Heartbeat


class Component(enum.StrEnum):
    """What kind of component beats."""

    RECEIVER = "receiver"  # the DICOM listener (its supervisor in ``serve``)
    WORKER = "worker"  # an analysis worker process
    DISPATCHER = "dispatcher"  # a delivery thread
    SCHEDULER = "scheduler"  # completion sweep, reapers, retention


@dataclass(frozen=True, kw_only=True)
class HeartbeatView:
    name: str
    component: Component
    host: str
    pid: int
    busy: bool
    started_at: dt.datetime
    beat_at: dt.datetime

    def age_seconds(self, now: dt.datetime) -> float:
        return max(0.0, (now - self.beat_at).total_seconds())


def beat(
    sessions: sessionmaker[Session],
    component: Component,
    name: str,
    *,
    now: dt.datetime,
    busy: bool = False,
    started_at: dt.datetime | None = None,
) -> None:
    """Record that ``name`` is alive at ``now`` (insert or update its row)."""
    with transaction(sessions, f"recording the heartbeat of {name}") as session:
        row = session.get(Heartbeat, name)
        if row is None:
            session.add(
                Heartbeat(
                    name=name[:160],
                    component=component.value,
                    host=socket.gethostname()[:64],
                    pid=os.getpid(),
                    busy=busy,
                    started_at=started_at or now,
                    beat_at=now,
                )
            )
        else:
            row.beat_at = now
            row.busy = busy


def forget(sessions: sessionmaker[Session], name: str) -> None:
    """Remove ``name``'s row: it stopped cleanly and is no longer expected to beat."""
    with transaction(sessions, f"removing the heartbeat of {name}") as session:
        session.execute(delete(Heartbeat).where(Heartbeat.name == name))


def prune(sessions: sessionmaker[Session], *, older_than: dt.datetime) -> int:
    """Drop rows of components silent since ``older_than`` (long dead; a restart has a new name)."""
    with transaction(sessions, "pruning old heartbeats") as session:
        result = session.execute(delete(Heartbeat).where(Heartbeat.beat_at < older_than))
        return int(getattr(result, "rowcount", 0) or 0)


def current(sessions: sessionmaker[Session]) -> list[HeartbeatView]:
    """Every component's last heartbeat, by component then name."""
    query = select(Heartbeat).order_by(Heartbeat.component, Heartbeat.name)
    with translate_errors("reading heartbeats"), sessions() as session:
        return [
            HeartbeatView(
                name=h.name,
                component=Component(h.component),
                host=h.host,
                pid=h.pid,
                busy=h.busy,
                started_at=h.started_at,
                beat_at=h.beat_at,
            )
            for h in session.scalars(query)
        ]
