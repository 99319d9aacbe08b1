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
* ``serve`` supervises them: a child that dies is restarted (the peers it served resend what was
  not acknowledged). On SIGTERM it forwards SIGTERM to every child and waits for them.
* A child dies with its parent (Linux ``PR_SET_PDEATHSIG``): after a ``kill -9`` of ``serve`` no
  receiver is left holding the port, exactly as with a single process.

Only processes of the same user may join a ``SO_REUSEPORT`` group (Linux), so another account
cannot take connections from the port.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import os
import signal
import socket
import sys
import threading
import time
from types import FrameType
from typing import Protocol

from daemon.config import Config
from daemon.dicom.scp import Receiver
from daemon.logs import setup_logging
from daemon.service.node import open_node
from storage.ingest import Ingest

log = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 60.0  # a child that has not listened by then fails the start
STOP_GRACE_SECONDS = 10.0  # in-flight associations get this long (as Receiver.stop), then abort
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


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
        # spawn: the parent runs threads (scheduler, dispatchers); fork would copy their locks.
        self.context = multiprocessing.get_context("spawn")
        self.processes: list[multiprocessing.process.BaseProcess] = []
        self._reservations: list[socket.socket] = []
        self._child_config: Config | None = None

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
            self._child_config = child
            started = [self._spawn(index) for index in range(self.count)]
            self.processes = [process for process, _ in started]
            for index, (process, report) in enumerate(started):
                _wait_ready(index, process, report)
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

    def _spawn(
        self, index: int
    ) -> tuple[multiprocessing.process.BaseProcess, multiprocessing.connection.Connection]:
        assert self._child_config is not None
        reader, writer = self.context.Pipe(duplex=False)
        process = self.context.Process(
            target=_child,
            args=(self._child_config, index, os.getpid(), writer),
            name=f"pacs-triage-receiver-{index}",
            daemon=False,
        )
        process.start()
        writer.close()  # the child holds the other end; EOF here means it died
        log.info("receiver process %d started (pid %s)", index, process.pid)
        return process, reader

    def check(self) -> None:
        """Restart receiver processes that died; their peers resend what was not acknowledged."""
        for index, process in enumerate(self.processes):
            if not process.is_alive():
                log.warning(
                    "receiver process %d (pid %s) exited with %s; restarting it",
                    index,
                    process.pid,
                    process.exitcode,
                )
                self.processes[index], report = self._spawn(index)
                report.close()  # the others serve meanwhile; the next check() sees if it died again

    def stop(self) -> None:
        """SIGTERM every child (in-flight stores finish or fail), wait, kill stragglers."""
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + STOP_GRACE_SECONDS + 10
        for process in self.processes:
            process.join(timeout=max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("receiver pid %s did not stop in time; killing it", process.pid)
                process.kill()
                process.join(timeout=5)
        self.processes = []
        for sock in self._reservations:
            sock.close()
        self._reservations = []

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.pid is not None]


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


def _wait_ready(
    index: int, process: multiprocessing.process.BaseProcess, report: multiprocessing.connection.Connection
) -> None:
    with report:
        if not report.poll(START_TIMEOUT_SECONDS):
            raise RuntimeError(f"receiver process {index} did not start within {START_TIMEOUT_SECONDS:.0f} s")
        try:
            problem = report.recv()
        except EOFError:
            process.join(timeout=5)
            raise RuntimeError(
                f"receiver process {index} exited with {process.exitcode} while starting (see its log)"
            ) from None
    if problem:
        raise OSError(f"receiver process {index} could not start: {problem}")


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when ``serve`` exits, however it exits (Linux)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _child(
    config: Config, index: int, parent_pid: int, report: multiprocessing.connection.Connection
) -> None:
    """Body of one receiver process: receive until SIGTERM/SIGINT (or the parent's death)."""
    _die_with_parent(parent_pid)
    setup_logging(config.logging.level)
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
            report.send(f"{type(exc).__name__}: {exc}")
            raise
        report.send("")
        report.close()
        stop.wait()
    finally:
        receiver.stop(grace_seconds=STOP_GRACE_SECONDS)
        node.close()
