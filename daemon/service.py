"""``pacs-triage serve``: the receiver (and, later, scheduler and workers) until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from daemon.config import Config
from daemon.node import open_node
from daemon.scp import Receiver

log = logging.getLogger(__name__)


def serve(
    config: Config, *, ready: threading.Event | None = None, stop: threading.Event | None = None
) -> None:
    """Run until ``stop`` is set or SIGTERM/SIGINT arrives; stop cleanly (in-flight stores finish)."""
    stop = stop or threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: stopping (in-flight stores finish first)", signal.Signals(signum).name)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)

    node = open_node(config)
    receiver = Receiver(config, node.ingest)
    try:
        receiver.start()
        log.info(
            "pacs-triage ready: database %s, spool %s (%.1f GiB free)",
            node.engine.url.render_as_string(hide_password=True),
            node.spool.root,
            node.spool.free_bytes() / 2**30,
        )
        if ready is not None:
            ready.set()
        stop.wait()
    finally:
        receiver.stop()
        node.close()
        log.info("pacs-triage stopped")
