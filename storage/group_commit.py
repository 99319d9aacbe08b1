"""Group commit: units of work from many threads share one transaction, so one commit serves
every unit that was waiting when it started (one WAL fsync, on an engine whose commits flush;
the receiver's rows commit without one where their files can rebuild them: storage/ingest.py).

A unit is acknowledged (its ``run`` returns) only after the commit that includes it succeeded;
durability per unit is unchanged. When several units share a transaction each runs in its own
savepoint, so one that raises (a duplicate row, a stale assumption) is rolled back alone and its
exception is raised in its own thread; the others commit. If the commit itself fails, every unit
of the batch gets that error and nothing of the batch is stored.

Leader/follower, no extra thread: a caller that finds no commit in progress commits the queue
(its own unit and any others waiting) and then wakes the rest; callers arriving meanwhile wait and
the first of them commits the next batch. A lone caller (one association) commits at once, as if
there were no group at all. Within one process this also means one writer at a time, instead of
several connections polling SQLite's busy handler for the write lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from sqlalchemy.engine import Connection, Engine

from storage.db import translate_errors

T = TypeVar("T")


@dataclass
class _Unit(Generic[T]):
    work: Callable[[Connection], T]
    finished: bool = False
    result: T | None = None
    error: BaseException | None = None


class GroupCommit:
    """Runs ``work(connection)`` callables in shared transactions of ``engine``."""

    def __init__(self, engine: Engine, what: str) -> None:
        self.engine = engine
        self.what = what  # for error messages: "database unavailable while <what>"
        self._cond = threading.Condition()
        self._queue: list[_Unit[object]] = []
        self._busy = False
        self.batches = 0  # statistics: transactions committed ...
        self.units = 0  # ... and the units they held

    def run(self, work: Callable[[Connection], T]) -> T:
        """Run ``work`` in a transaction shared with concurrent callers; return once committed."""
        unit: _Unit[T] = _Unit(work)
        with self._cond:
            self._queue.append(unit)  # type: ignore[arg-type]  # a queue of mixed result types
            while self._busy and not unit.finished:
                self._cond.wait()
            lead = not unit.finished  # else a leader committed it (or failed it) while we waited
            if lead:
                self._busy = True
                batch, self._queue = self._queue, []
        if lead:
            try:
                self._commit(batch)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
        if unit.error is not None:
            raise unit.error
        return unit.result  # type: ignore[return-value]  # set by _commit when no error

    def _commit(self, batch: list[_Unit[object]]) -> None:
        try:
            with translate_errors(self.what), self.engine.begin() as conn:
                self._run_units(conn, batch)
        except BaseException as exc:  # noqa: BLE001 - handed to every unit of the batch
            # Nothing of this batch is stored: each unit fails with its own error or this one.
            for unit in batch:
                unit.error = unit.error or exc
        else:
            self.batches += 1
            self.units += len(batch)
        finally:
            for unit in batch:
                unit.finished = True

    @staticmethod
    def _run_units(conn: Connection, batch: list[_Unit[object]]) -> None:
        if len(batch) == 1:
            batch[0].result = batch[0].work(conn)  # its error rolls back the transaction
            return
        for unit in batch:
            savepoint = conn.begin_nested()
            try:
                unit.result = unit.work(conn)
            except Exception as exc:  # noqa: BLE001 - raised in the unit's own thread
                savepoint.rollback()
                unit.error = exc
            else:
                savepoint.commit()
