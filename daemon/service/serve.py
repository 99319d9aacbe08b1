"""``pacs-triage serve``: the receiver, scheduler, dispatchers and worker processes until SIGTERM/SIGINT."""

from __future__ import annotations

import datetime as dt
import logging
import signal
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Protocol

from daemon.config import Config
from daemon.delivery.dispatcher import DispatchThreads
from daemon.delivery.registry import check_destinations
from daemon.pipelines.registry import check_routing
from daemon.service.liveness import Beacon, beat_interval
from daemon.service.node import Node, open_node
from daemon.service.receivers import make_receiver
from daemon.service.scheduler import Scheduler
from daemon.service.systemd import Notifier
from daemon.service.worker import WorkerPool
from storage import heartbeats
from storage.errors import StorageError
from storage.heartbeats import Component
from storage.leases import worker_name
from storage.models import utcnow
from storage.outbox import Outbox
from storage.queue import JobQueue
from storage.spool import Spool

log = logging.getLogger(__name__)


SUPERVISE_SECONDS = 1.0
# A send cut short at shutdown is resent after its lease expires; the PACS ignores the duplicate.
DISPATCH_STOP_SECONDS = 10.0


class Addon(Protocol):
    """Something ``serve`` runs beside its own parts, on the same node (the HTTP server)."""

    def start(self) -> None: ...
    def stop(self) -> None: ...


HEARTBEATS_KEPT_SECONDS = 3600.0  # rows of components silent this long are removed (restarts get new names)


class _Beacons:
    """Heartbeats of what runs in this process: the DICOM listener, the dispatchers, the scheduler."""

    def __init__(self, node: Node) -> None:
        self.sessions = node.sessions
        every = beat_interval(node.config)
        self.receiver = Beacon(node.sessions, Component.RECEIVER, worker_name("receiver"), interval=every)
        self.dispatcher = Beacon(
            node.sessions, Component.DISPATCHER, worker_name("dispatcher"), interval=every
        )
        self.scheduler = Beacon(node.sessions, Component.SCHEDULER, worker_name("scheduler"), interval=every)
        self.pruned_at = 0.0

    def beat(self, *, receiver: bool, dispatcher: bool, scheduler: bool) -> None:
        for beacon, alive in (
            (self.receiver, receiver),
            (self.dispatcher, dispatcher),
            (self.scheduler, scheduler),
        ):
            if alive:
                beacon.beat()
        now = utcnow()
        if now.timestamp() - self.pruned_at > HEARTBEATS_KEPT_SECONDS / 4:
            self.pruned_at = now.timestamp()
            try:
                heartbeats.prune(
                    self.sessions, older_than=now - dt.timedelta(seconds=HEARTBEATS_KEPT_SECONDS)
                )
            except StorageError as exc:
                log.warning("old heartbeats not pruned: %s", exc)

    def forget(self) -> None:
        for beacon in (self.receiver, self.dispatcher, self.scheduler):
            beacon.forget()


def serve(
    config: Config,
    *,
    workers: int | None = None,
    ready: threading.Event | None = None,
    stop: threading.Event | None = None,
    addons: Sequence[Callable[[Node], Addon]] = (),
) -> None:
    """Run until ``stop`` is set or SIGTERM/SIGINT arrives; stop cleanly (in-flight stores finish).

    ``workers`` worker processes (default ``workers.count``) run the jobs. ``addons`` are built on
    the open node and started last, stopped first: the HTTP server (``daemon/http/server.py``),
    which the command line passes in because ``daemon.http`` sits above this package.
    """
    stop = stop or threading.Event()
    check_routing(config)
    check_destinations(config)  # a destination kind whose extra is not installed: refuse to start
    if workers is not None:  # --workers: the effective count is what readiness and metrics expect
        config = config.model_copy(update={"workers": config.workers.model_copy(update={"count": workers})})

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: stopping (in-flight stores finish first)", signal.Signals(signum).name)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)

    node = open_node(config)
    receiver = make_receiver(config, node.ingest)  # in-process, or dicom.receivers processes
    queue = JobQueue(
        node.sessions, lease_seconds=config.workers.lease_seconds, backoff=config.workers.backoff.policy()
    )
    outbox = Outbox(
        node.sessions, lease_seconds=config.dispatch.lease_seconds, backoff=config.dispatch.backoff.policy()
    )
    results = Spool(config.results_dir, min_free_bytes=config.storage.min_free_bytes)
    results.open()
    scheduler = Scheduler(config, node.sessions, node.spool, results, queue, outbox)
    dispatch = DispatchThreads(config, outbox, results)
    pool = WorkerPool(config, config.workers.count)
    beacons = _Beacons(node)
    extras = [make(node) for make in addons]
    notifier = Notifier.from_environment()
    try:
        receiver.start()
        scheduler.start()
        dispatch.start()
        pool.start()
        for extra in extras:
            extra.start()
        log.info(
            "pacs-triage ready: database %s, spool %s (%.1f GiB free)",
            node.engine.url.render_as_string(hide_password=True),
            node.spool.root,
            node.spool.free_bytes() / 2**30,
        )
        if ready is not None:
            ready.set()
        notifier.ready(f"receiving as {config.ae_title} on port {config.port}")
        while True:
            beacons.beat(
                receiver=True,  # receiver.check() raised otherwise
                dispatcher=any(t.is_alive() for t in dispatch.threads),
                scheduler=scheduler.scheduler.running,
            )
            notifier.watchdog()  # the supervision loop turns: systemd's WatchdogSec= is satisfied
            if stop.wait(SUPERVISE_SECONDS):
                break
            receiver.check()
            pool.check()
            dispatch.check()
    finally:
        notifier.stopping()
        for extra in reversed(extras):
            extra.stop()
        receiver.stop()
        pool.stop()
        dispatch.stop(timeout=DISPATCH_STOP_SECONDS)
        scheduler.stop()
        beacons.forget()
        node.close()
        log.info("pacs-triage stopped")
