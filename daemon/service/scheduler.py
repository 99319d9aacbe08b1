"""The scheduler of ``serve``: short, idempotent database work on intervals (APScheduler 3).

* completion sweep: complete, route and queue studies (``daemon/service/routing.py``);
* job reaper: requeue jobs whose worker stopped heartbeating;
* delivery reaper: requeue sends whose dispatcher died (the dispatch threads retry them);
* retention: remove the files of studies delivered, failed or not routed long ago ([retention]).

Each task is safe to run twice or concurrently with another ``serve`` on the same database, and
at most one instance of each runs at a time. A database outage makes a task log and skip a turn;
the next turn recovers by itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Config
from daemon.service.routing import CompletionSweep
from storage import retention
from storage.errors import StorageError
from storage.models import utcnow
from storage.outbox import Outbox
from storage.queue import JobQueue
from storage.spool import Spool

log = logging.getLogger(__name__)


def _guarded(name: str, task: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        try:
            task()
        except StorageError as exc:
            log.warning("%s skipped this turn: %s", name, exc)

    run.__name__ = name
    return run


class Scheduler:
    """Owns the BackgroundScheduler and the tasks it runs."""

    def __init__(
        self,
        config: Config,
        sessions: sessionmaker[Session],
        spool: Spool,
        results: Spool,
        queue: JobQueue,
        outbox: Outbox,
    ) -> None:
        self.config = config
        self.sessions = sessions
        self.spool = spool
        self.results = results
        self.sweep = CompletionSweep(config, sessions, spool)
        self.queue = queue
        self.outbox = outbox
        self.scheduler = BackgroundScheduler(
            timezone="UTC",
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )

    def _reap_jobs(self) -> None:
        if (n := self.queue.reap()) > 0:
            log.warning("requeued %d job(s) whose lease expired", n)

    def _reap_deliveries(self) -> None:
        if (n := self.outbox.reap()) > 0:
            log.warning("requeued %d delivery(ies) whose lease expired", n)

    def _retention(self) -> None:
        r = self.config.retention
        periods = retention.Periods(
            delivered_days=r.delete_after_days,
            failed_days=r.failed_after_days,
            not_routed_days=r.not_routed_after_days,
        )
        retention.run(self.sessions, self.spool, self.results, periods=periods, now=utcnow())

    def start(self) -> None:
        c = self.config
        tasks: list[tuple[str, Callable[[], object], float]] = [
            ("completion-sweep", self.sweep.run_once, c.completion.sweep_interval_seconds),
            ("job-reaper", self._reap_jobs, c.workers.reap_interval_seconds),
            ("delivery-reaper", self._reap_deliveries, c.dispatch.reap_interval_seconds),
        ]
        if c.retention.enabled:
            tasks.append(("retention", self._retention, c.retention.interval_seconds))
        for name, task, seconds in tasks:
            self.scheduler.add_job(
                _guarded(name, task), "interval", seconds=seconds, id=name, name=name, next_run_time=utcnow()
            )
        if not log.isEnabledFor(logging.DEBUG):
            # APScheduler logs every run of every task at INFO: once a second is noise.
            logging.getLogger("apscheduler.executors.default").setLevel(logging.WARNING)
        self.scheduler.start()
        log.info("scheduler started: %s", ", ".join(f"{n} every {s:g} s" for n, _, s in tasks))

    def stop(self) -> None:
        """Stop scheduling; wait for running tasks (each is a short transaction)."""
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
