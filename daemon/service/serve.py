"""``pacs-triage serve``: the receiver, scheduler, dispatchers and worker processes until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from daemon.config import Config
from daemon.delivery.dispatcher import DispatchThreads
from daemon.pipelines.registry import check_routing
from daemon.service.node import open_node
from daemon.service.receivers import make_receiver
from daemon.service.scheduler import Scheduler
from daemon.service.worker import WorkerPool
from storage.outbox import Outbox
from storage.queue import JobQueue
from storage.spool import Spool

log = logging.getLogger(__name__)


SUPERVISE_SECONDS = 1.0
# A send cut short at shutdown is resent after its lease expires; the PACS ignores the duplicate.
DISPATCH_STOP_SECONDS = 10.0


def serve(
    config: Config,
    *,
    workers: int | None = None,
    ready: threading.Event | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Run until ``stop`` is set or SIGTERM/SIGINT arrives; stop cleanly (in-flight stores finish).

    ``workers`` worker processes (default ``workers.count``) run the jobs.
    """
    stop = stop or threading.Event()
    check_routing(config)

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
    pool = WorkerPool(config, config.workers.count if workers is None else workers)
    try:
        receiver.start()
        scheduler.start()
        dispatch.start()
        pool.start()
        log.info(
            "pacs-triage ready: database %s, spool %s (%.1f GiB free)",
            node.engine.url.render_as_string(hide_password=True),
            node.spool.root,
            node.spool.free_bytes() / 2**30,
        )
        if ready is not None:
            ready.set()
        while not stop.wait(SUPERVISE_SECONDS):
            receiver.check()
            pool.check()
            dispatch.check()
    finally:
        receiver.stop()
        pool.stop()
        dispatch.stop(timeout=DISPATCH_STOP_SECONDS)
        scheduler.stop()
        node.close()
        log.info("pacs-triage stopped")
