"""Readiness of the node: can it receive, store, analyse and deliver right now?

Read from the database and the spool, never from this process's memory, so that the answer covers
every receiver, worker and dispatcher of the node whichever process asks. Components:

* ``database``: reachable, and its schema at the revision this code needs;
* ``spool``: a file can be created and removed in it;
* ``disk``: free space above ``storage.min_free_bytes`` (bytes left reported);
* ``dicom_listener``, ``workers``, ``dispatcher``, ``scheduler``: a heartbeat fresher than
  ``http.heartbeat_stale_seconds`` (``storage/heartbeats.py``).
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Config
from storage import heartbeats
from storage.errors import StorageError
from storage.heartbeats import Component, HeartbeatView
from storage.migrate import head_revision
from storage.spool import Spool


@dataclass(frozen=True)
class ComponentHealth:
    ok: bool
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Readiness:
    ready: bool
    components: dict[str, ComponentHealth]


@functools.cache
def _head(engine: Engine) -> str | None:
    return head_revision(engine)


def _database(engine: Engine) -> ComponentHealth:
    try:
        with engine.connect() as conn:
            # The version table directly: alembic's MigrationContext logs at INFO on every probe.
            have = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        want = _head(engine)
    except (SQLAlchemyError, StorageError, OSError) as exc:
        first_line = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [""])[0]
        return ComponentHealth(False, f"unreachable: {type(exc).__name__}: {first_line[:300]}")
    if have != want:
        return ComponentHealth(
            False,
            f"schema at revision {have}, this version needs {want}: run `pacs-triage db upgrade`",
            {"revision": have, "head": want},
        )
    return ComponentHealth(True, f"reachable, schema at {have}", {"revision": have})


def _spool(spool: Spool) -> ComponentHealth:
    probe = spool.tmp / f"readyz-{os.getpid()}-{threading.get_ident()}.probe"
    try:
        with probe.open("wb") as fh:
            fh.write(b"readyz")
        probe.unlink()
    except OSError as exc:
        return ComponentHealth(
            False, f"not writable: {exc.strerror or exc} ({spool.root})", {"path": str(spool.root)}
        )
    return ComponentHealth(True, f"writable ({spool.root})", {"path": str(spool.root)})


def _disk(spool: Spool) -> ComponentHealth:
    try:
        free = spool.free_bytes()
    except OSError as exc:
        return ComponentHealth(False, f"cannot read free space: {exc}")
    data = {"free_bytes": free, "min_free_bytes": spool.min_free_bytes}
    if free < spool.min_free_bytes:
        return ComponentHealth(
            False, f"{free} bytes free, below storage.min_free_bytes = {spool.min_free_bytes}", data
        )
    return ComponentHealth(True, f"{free / 2**30:.1f} GiB free", data)


def _beats(
    beats: list[HeartbeatView] | None,
    component: Component,
    *,
    expected: int,
    stale_seconds: float,
    now: dt.datetime,
) -> ComponentHealth:
    """Ok when at least ``expected`` of them beat recently (0: not run here; others are listed)."""
    if beats is None:
        return ComponentHealth(False, "unknown: the database cannot be read")
    mine = [b for b in beats if b.component == component]
    items = [
        {
            "name": b.name,
            "host": b.host,
            "pid": b.pid,
            "busy": b.busy,
            "age_seconds": round(b.age_seconds(now), 1),
            "fresh": b.age_seconds(now) <= stale_seconds,
        }
        for b in mine
    ]
    fresh = sum(1 for i in items if i["fresh"])
    data: dict[str, Any] = {"fresh": fresh, "stale": len(items) - fresh, "items": items}
    data["expected"] = expected
    silent = f", {len(items) - fresh} silent" if fresh < len(items) else ""
    if not expected:
        return ComponentHealth(True, f"not run on this node ({fresh} alive elsewhere{silent})", data)
    if fresh < expected:
        last = f"; last seen {min(b.age_seconds(now) for b in mine):.0f} s ago" if mine else ""
        return ComponentHealth(
            False, f"{fresh} of {expected} beat in the last {stale_seconds:g} s{silent}{last}", data
        )
    return ComponentHealth(True, f"{fresh} alive{silent}", data)


def readiness(
    config: Config, engine: Engine, sessions: sessionmaker[Session], spool: Spool, *, now: dt.datetime
) -> Readiness:
    """Check every component; ready when all are ok."""
    stale = config.http.heartbeat_stale_seconds
    database = _database(engine)
    beats: list[HeartbeatView] | None = None
    if database.ok:
        try:
            beats = heartbeats.current(sessions)
        except StorageError:
            beats = None
    components = {
        "database": database,
        "spool": _spool(spool),
        "disk": _disk(spool),
        "dicom_listener": _beats(beats, Component.RECEIVER, expected=1, stale_seconds=stale, now=now),
        "workers": _beats(
            beats,
            Component.WORKER,
            expected=config.workers.count,  # this node's pool; workers on other hosts come on top
            # a busy worker beats with its job's lease heartbeat
            stale_seconds=max(stale, 2 * config.workers.heartbeat_interval),
            now=now,
        ),
        "dispatcher": _beats(
            beats,
            Component.DISPATCHER,
            expected=1 if config.dispatch.threads > 0 else 0,  # one row per serve process
            stale_seconds=stale,
            now=now,
        ),
        "scheduler": _beats(beats, Component.SCHEDULER, expected=1, stale_seconds=stale, now=now),
    }
    return Readiness(ready=all(c.ok for c in components.values()), components=components)
