"""Several DICOM receiver processes on one port (``dicom.receivers`` > 1).

Why: pynetdicom spends 2-4 ms of Python per C-STORE in its protocol layers and our handler, all
under one GIL per process, so one process tops out at a few hundred small instances per second
however many cores the host has (measured in tests/benchmarks/ingest.py and README "Ingest
benchmark"). With N processes that each bind the port with ``SO_REUSEPORT``, the kernel spreads
incoming connections over them (by a hash of the connection's addresses, so an association stays
in the process that accepted it); each process has its own GIL and its own database connections
and writes the shared spool with the same protocol as ever. SQLite serialises the writers
(``BEGIN IMMEDIATE`` + busy timeout), PostgreSQL with row locks.

Processes:

* ``serve`` (the parent) applies the migrations and opens the spool as before, then reserves the
  port(s): a socket bound with ``SO_REUSEPORT`` but never listening. That resolves port 0, keeps
  the port ours while a child restarts, and receives nothing (the kernel hands connections only to
  listening sockets). Before that, a plain bind probes the port, so a port already served (even by
  another pacs-triage with ``SO_REUSEPORT``) fails as it does with one receiver instead of silently
  sharing it. The parent then spawns the N children, waits until each listens, and goes on running
  the scheduler, dispatchers and workers; it receives nothing itself.
* Each child runs one :class:`daemon.dicom.scp.Receiver` until SIGTERM/SIGINT and stops like the
  single-process receiver: stop accepting, let in-flight associations finish, abort the rest; a
  store is acknowledged only once durable, so nothing is half-recorded.
* ``serve`` supervises them with :mod:`daemon.service.supervisor`: a child that dies is restarted
  with backoff (the peers it served resend what was not acknowledged). On SIGTERM it forwards
  SIGTERM to every child and waits for them.
* A child dies with its parent (SIGKILL by ``PR_SET_PDEATHSIG``): after a ``kill -9`` of ``serve``
  no receiver is left holding the port, exactly as with a single process.

Only processes of the same user may join a ``SO_REUSEPORT`` group (Linux), so another account
cannot take connections from the port.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from pathlib import Path
from types import FrameType
from typing import Protocol

from daemon import telemetry
from daemon.config import Config
from daemon.dicom.scp import Receiver
from daemon.logs import setup_logging
from daemon.service.node import open_node
from daemon.service.supervisor import ChildSpec, Readiness, Supervisor
from storage.ingest import Ingest

log = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 60.0  # a child that has not listened by then fails the start
STOP_GRACE_SECONDS = 10.0  # in-flight associations get this long (as Receiver.stop), then abort


class ReceiverService(Protocol):
    """What ``serve`` needs of its receiver, in-process or as processes."""

    def start(self) -> list[tuple[str, int, bool]]: ...
    def check(self) -> None: ...
    def stop(self) -> None: ...


def make_receiver(config: Config, ingest: Ingest) -> ReceiverService:
    """The receiver ``serve`` runs: in its own process (1), or ``dicom.receivers`` child processes."""
    if config.dicom.receivers == 1:
        return Receiver(config, ingest)
    return ReceiverProcesses(config, config.dicom.receivers)


class ReceiverProcesses:
    """N receiver processes sharing the DICOM port(s); started, supervised, stopped by ``serve``."""

    def __init__(self, config: Config, count: int) -> None:
        self.config = config
        self.count = count
        self.supervisor: Supervisor | None = None
        self._reservations: list[socket.socket] = []
        self._pids: set[int] = set()  # the children seen alive at the last check

    def start(self) -> list[tuple[str, int, bool]]:
        """Reserve the port(s), start the children and wait until every one listens."""
        host = self.config.dicom.bind_address
        try:
            plain = _reserve(host, self.config.port)
            self._reservations.append(plain)
            port = int(plain.getsockname()[1])
            bound = [(host, port, False)]
            child = self.config.model_copy(update={"port": port})
            if self.config.tls.enabled:
                tls = _reserve(host, self.config.tls.port)
                self._reservations.append(tls)
                tls_port = int(tls.getsockname()[1])
                bound.append((host, tls_port, True))
                child = child.model_copy(
                    update={"tls": self.config.tls.model_copy(update={"port": tls_port})}
                )
            # Their counters and histograms (telemetry) are summed from here by the HTTP /metrics.
            shared = telemetry.prepare_shared_directory(telemetry.shared_directory(self.config.home))
            spec = ChildSpec(
                kind="receiver",
                target=_child,
                args=(child, shared),
                stop_grace_seconds=STOP_GRACE_SECONDS + 10,
                start_timeout_seconds=START_TIMEOUT_SECONDS,
            )
            self.supervisor = Supervisor(spec, self.count)
            self.supervisor.start(wait=True)
            self._pids = set(self.supervisor.pids())
        except BaseException:
            self.stop()
            raise
        for address, bound_port, is_tls in bound:
            log.info(
                "%d receiver processes listening as %s on %s:%d%s",
                self.count,
                self.config.ae_title,
                address,
                bound_port,
                " (TLS)" if is_tls else "",
            )
        return bound

    def check(self) -> None:
        """Restart receiver processes that died; their peers resend what was not acknowledged."""
        if self.supervisor is not None:
            self.supervisor.check()
            alive = set(self.supervisor.pids())
            for pid in self._pids - alive:
                # Its open associations died with it: take them out of the active gauge.
                telemetry.forget_process(telemetry.shared_directory(self.config.home), pid)
            self._pids = alive

    def stop(self) -> None:
        """SIGTERM every child (in-flight stores finish or fail), wait, kill stragglers."""
        if self.supervisor is not None:
            self.supervisor.stop()
            self.supervisor = None
        for sock in self._reservations:
            sock.close()
        self._reservations = []

    def pids(self) -> list[int]:
        return self.supervisor.pids() if self.supervisor is not None else []


def _reserve(host: str, port: int) -> socket.socket:
    """A bound, non-listening SO_REUSEPORT socket holding ``port`` for the children (0: any free)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if port:
        # Probe without SO_REUSEPORT: refused if anything listens there, even another process
        # using SO_REUSEPORT, which would otherwise share our connections without a word.
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _child(index: int, readiness: Readiness, config: Config, metrics_dir: Path) -> None:
    """Body of one receiver process: receive until SIGTERM/SIGINT (or the parent's death)."""
    telemetry.share_through(metrics_dir)  # before any instrument exists in this process
    setup_logging(config.logging)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("receiver %d: %s received; stopping", index, signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # The parent applied the migrations; opening the spool again is cheap and harmless (it only
    # removes temp files of dead processes) and prepares this process's directory bookkeeping.
    node = open_node(config, migrate=False)
    receiver = Receiver(config, node.ingest, reuse_port=True)
    try:
        try:
            receiver.start()
        except Exception as exc:
            readiness.failed(f"{type(exc).__name__}: {exc}")
            raise
        readiness.ready()
        stop.wait()
    finally:
        receiver.stop(grace_seconds=STOP_GRACE_SECONDS)
        node.close()
