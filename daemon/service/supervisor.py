"""One supervisor for the child processes of ``serve``: receivers and workers alike.

What it promises, for every kind of child:

* **Start N children** (``spawn``: the parent runs threads, and ``fork`` would copy their locks),
  each with a readiness pipe. :meth:`Supervisor.start` can wait until every child says it is ready
  (receivers: listening) or failed to start (the error travels back and fails the start).
* **Restart a dead child with backoff.** A child that dies is started again after a delay that
  doubles with each death in a row of a short-lived child (1 s, 2 s, 4 s ... up to a minute), so a
  crash loop costs a log line a minute, not a process a second; a child that ran long enough
  (``stable_seconds``) before dying is restarted after the first delay again.
* **Children die with the parent** (Linux ``PR_SET_PDEATHSIG``): after a ``kill -9`` of ``serve``
  the kernel signals every child, so none is left holding a port or a job. The signal is chosen per
  kind: receivers are killed (their peers resend what was not acknowledged), workers get SIGTERM and
  finish or give back their job. The kernel sends it when the *thread* that started the child ends,
  so :meth:`start` and :meth:`check` must run on the thread that lives as long as ``serve``.
* **Clean stop**: SIGTERM to every child, wait for the grace period, then SIGKILL the stragglers.

The readiness pipe stays open on the parent's side until the child reported (or died): a child
writing to a pipe whose reader is gone dies of ``BrokenPipeError`` (issue 11 item 14: restarted
receivers died that way every ~3 s).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class ChildStartError(OSError):
    """A child process did not become ready; the message names it and says where to look."""


@dataclass(frozen=True, kw_only=True)
class RestartPolicy:
    """How long a dead child waits before it is started again."""

    first_delay_seconds: float = 1.0
    max_delay_seconds: float = 60.0
    stable_seconds: float = 60.0  # a child that lived this long did not crash-loop

    def __post_init__(self) -> None:
        if not 0 <= self.first_delay_seconds <= self.max_delay_seconds:
            raise ValueError(
                f"restart delays must satisfy 0 <= first ({self.first_delay_seconds}) "
                f"<= max ({self.max_delay_seconds})"
            )

    def delay(self, deaths_in_a_row: int) -> float:
        """The wait before restart number ``deaths_in_a_row`` (1: the first death after a stable run)."""
        doublings = min(max(deaths_in_a_row - 1, 0), 32)
        return float(min(self.max_delay_seconds, self.first_delay_seconds * 2**doublings))


class Readiness:
    """The child's end of its readiness pipe: say once that it is ready, or why it could not start."""

    def __init__(self, connection: multiprocessing.connection.Connection) -> None:
        self._connection: multiprocessing.connection.Connection | None = connection

    def ready(self) -> None:
        self._report("")

    def failed(self, problem: str) -> None:
        self._report(problem or "unknown error")

    def _report(self, message: str) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            connection.send(message)
        except OSError as exc:  # the parent is gone or stopped listening; nothing to tell
            log.debug("could not report readiness: %s", exc)
        finally:
            connection.close()


# The child's body: ``target(index, readiness, *args)``; a module-level function (spawn pickles it).
ChildTarget = Callable[..., None]


@dataclass(frozen=True, kw_only=True)
class ChildSpec:
    """One kind of child process."""

    kind: str  # "receiver", "worker": used in process names and log lines
    target: ChildTarget
    args: tuple[object, ...] = ()
    death_signal: signal.Signals = signal.SIGKILL  # sent by the kernel when serve dies
    stop_grace_seconds: float = 10.0  # after SIGTERM, before SIGKILL
    start_timeout_seconds: float = 60.0  # for start(wait=True)


@dataclass
class _Child:
    index: int
    process: multiprocessing.process.BaseProcess
    report: multiprocessing.connection.Connection | None  # until the child reported or died
    started_at: float
    ready: bool = False


class Supervisor:
    """N children of one :class:`ChildSpec`: started, restarted with backoff, stopped."""

    def __init__(
        self,
        spec: ChildSpec,
        count: int,
        *,
        policy: RestartPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if count < 0:
            raise ValueError(f"a supervisor needs a count >= 0, got {count}")
        self.spec = spec
        self.count = count
        self.policy = policy or RestartPolicy()
        self.clock = clock
        self.context = multiprocessing.get_context("spawn")
        self.restarts = 0  # how many children were started again, for logs and tests
        self._children: list[_Child] = []
        self._deaths_in_a_row: list[int] = []
        self._restart_at: list[float | None] = []

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, *, wait: bool = True) -> None:
        """Start every child; with ``wait``, return once each reported ready (else raise)."""
        try:
            self._children = [self._spawn(index) for index in range(self.count)]
            self._deaths_in_a_row = [0] * self.count
            self._restart_at = [None] * self.count
            if wait:
                for child in self._children:
                    self._wait_ready(child)
        except BaseException:
            self.stop()
            raise

    def check(self) -> None:
        """Collect readiness reports; schedule and perform the restart of dead children."""
        now = self.clock()
        for index, child in enumerate(self._children):
            self._poll_report(child)
            if child.process.is_alive():
                continue
            due = self._restart_at[index]
            if due is None:
                lived = now - child.started_at
                deaths = 1 if lived >= self.policy.stable_seconds else self._deaths_in_a_row[index] + 1
                self._deaths_in_a_row[index] = deaths
                delay = self.policy.delay(deaths)
                due = self._restart_at[index] = now + delay
                log.warning(
                    "%s process %d (pid %s) exited with %s after %.0f s; restarting it in %.0f s%s",
                    self.spec.kind,
                    index,
                    child.process.pid,
                    _describe_exit(child.process.exitcode),
                    lived,
                    delay,
                    f" ({deaths} deaths in a row)" if deaths > 1 else "",
                )
                self._close_report(child)
            if now >= due:
                self._restart_at[index] = None
                self._children[index] = self._spawn(index)
                self.restarts += 1

    def stop(self) -> None:
        """SIGTERM every child, wait up to the grace period, then SIGKILL what is left."""
        for child in self._children:
            if child.process.is_alive():
                child.process.terminate()
        deadline = time.monotonic() + self.spec.stop_grace_seconds
        for child in self._children:
            child.process.join(timeout=max(0.1, deadline - time.monotonic()))
            if child.process.is_alive():
                log.warning(
                    "%s process %d (pid %s) did not stop within %.0f s; killing it",
                    self.spec.kind,
                    child.index,
                    child.process.pid,
                    self.spec.stop_grace_seconds,
                )
                child.process.kill()
                child.process.join(timeout=5)
            self._close_report(child)
        self._children = []

    def pids(self) -> list[int]:
        return [c.process.pid for c in self._children if c.process.pid is not None and c.process.is_alive()]

    # -- inside -------------------------------------------------------------------------------

    def _spawn(self, index: int) -> _Child:
        reader, writer = self.context.Pipe(duplex=False)
        process = self.context.Process(
            target=_bootstrap,
            args=(self.spec, index, os.getpid(), writer),
            name=f"pacs-triage-{self.spec.kind}-{index}",
            daemon=False,
        )
        process.start()
        writer.close()  # the child holds the other end: EOF on ours means it died
        log.info("%s process %d started (pid %s)", self.spec.kind, index, process.pid)
        return _Child(index=index, process=process, report=reader, started_at=self.clock())

    def _wait_ready(self, child: _Child) -> None:
        report = child.report
        assert report is not None
        timeout = self.spec.start_timeout_seconds
        if not report.poll(timeout):
            raise ChildStartError(
                f"{self.spec.kind} process {child.index} did not start within {timeout:.0f} s"
            )
        problem = self._poll_report(child)
        if problem:
            raise ChildStartError(f"{self.spec.kind} process {child.index} could not start: {problem}")
        if not child.ready:
            child.process.join(timeout=5)
            raise ChildStartError(
                f"{self.spec.kind} process {child.index} exited with "
                f"{_describe_exit(child.process.exitcode)} while starting (see the log above)"
            )

    def _poll_report(self, child: _Child) -> str | None:
        """Read the child's report if it came: marks it ready, or returns why it could not start."""
        report = child.report
        if report is None or not report.poll(0):
            return None
        try:
            problem: str = report.recv()
        except EOFError:  # it died before saying anything; its exit is handled by the caller
            return None
        finally:
            self._close_report(child)
        if problem:
            # The child exits after this; its death is restarted (with backoff) like any other.
            log.error("%s process %d could not start: %s", self.spec.kind, child.index, problem)
            return problem
        child.ready = True
        log.debug("%s process %d (pid %s) is ready", self.spec.kind, child.index, child.process.pid)
        return None

    @staticmethod
    def _close_report(child: _Child) -> None:
        if child.report is not None:
            child.report.close()
            child.report = None


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "no exit code yet"
    if exitcode < 0:
        try:
            return f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


def die_with_parent(parent_pid: int, death_signal: signal.Signals) -> None:
    """Have the kernel send ``death_signal`` to this process when its parent exits (Linux)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(death_signal), 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _bootstrap(
    spec: ChildSpec, index: int, parent_pid: int, connection: multiprocessing.connection.Connection
) -> None:
    """First code of every child: tie its life to the parent's, then run the kind's body."""
    die_with_parent(parent_pid, spec.death_signal)
    spec.target(index, Readiness(connection), *spec.args)
