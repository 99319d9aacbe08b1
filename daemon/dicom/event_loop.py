"""pynetdicom's two per-association loops, woken by work instead of polling every millisecond.

pynetdicom 3.0 runs two threads per association, each looping with ``time.sleep(0.001)``
between checks of its queues: the DUL (``DULServiceProvider.run_reactor``: socket, primitives to
send, state-machine events) and the association (``Association._run_reactor``: decoded DIMSE
messages, release and abort). Profiled in the receiver (issue 15), that polling was 27 % of the
association thread's wall time, and it adds up to a millisecond of latency at each hand-over
(request in -> handler -> response out).

:func:`install` keeps pynetdicom's loops as they are and changes only what their sleep does,
for the threads of one association:

* the queues each loop reads are replaced (same contents) by :class:`_WakingQueue`, whose ``put``
  also wakes the loop that reads it;
* in ``pynetdicom.dul`` and ``pynetdicom.association`` the name ``time`` is bound to
  :data:`_TIME`, which is the ``time`` module except for the two reactor sleeps, called from
  a reactor thread of an association that went through :func:`install`: the DUL waits in
  ``select`` for its socket or a wake-up, the association waits for a wake-up; both for at most
  ``MAX_WAIT`` seconds, so timers (ARTIM, network idle) and kill flags are still seen in time.

Every other caller of ``time`` in those modules (and every association that was not installed,
e.g. our SCU) gets the real module. This and ``daemon/dicom/hardening.py`` are the only modules
that patch pynetdicom internals; ``tests/dicom/test_pynetdicom_event_loop.py`` fails if an upgrade
moves the patch points (the sleep calls, the queue attributes).
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import ssl
import threading
import time
import types
import weakref
from collections.abc import Callable
from typing import Any

import pynetdicom.association
import pynetdicom.dul
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

MAX_WAIT = 0.05  # seconds a reactor sleeps at most without a wake-up
_ASSOCIATION_SLEEP = 0.001  # the literal of Association._run_reactor's sleep


class _WakingQueue(queue.Queue[Any]):  # holds whatever pynetdicom puts
    """A ``queue.Queue`` that calls ``wake`` after each ``put`` (under the queue's own lock)."""

    def __init__(self, wake: Callable[[], None], items: list[Any]) -> None:
        super().__init__()
        self._wake = wake
        self.queue.extend(items)

    def _put(self, item: Any) -> None:
        super()._put(item)
        self._wake()


class _AssociationWaker:
    """An event the association's loop waits on; its queues set it."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.waits = 0

    def wake(self) -> None:
        self._event.set()

    def wait(self) -> None:
        self.waits += 1
        self._event.wait(MAX_WAIT)
        self._event.clear()  # then the loop checks its queues: nothing put before this is missed


class _DulWaker:
    """A self-pipe: the DUL thread waits in ``select`` on it and on the peer's socket."""

    def __init__(self, dul: DULServiceProvider) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._dul = weakref.ref(dul)
        self.waits = 0  # sleeps of the DUL's loop that waited here (tests check the patch is live)
        weakref.finalize(dul, _close, self._read, self._write)

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):  # full: a wake-up is pending anyway
            os.write(self._write, b"\0")

    def wait(self, seconds: float) -> None:
        self.waits += 1
        dul = self._dul()
        wrapper = dul.socket if dul is not None else None
        sock = getattr(wrapper, "socket", None)
        if sock is None or sock.fileno() < 0:
            time.sleep(seconds)
            return
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted bytes already buffered: select cannot see them
        try:
            select.select([sock, self._read], [], [], MAX_WAIT)
        except (OSError, ValueError):
            time.sleep(seconds)  # closed meanwhile: the reactor notices on its next check
            return
        with contextlib.suppress(BlockingIOError, OSError):
            os.read(self._read, 4096)


def _close(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class _ReactorTime(types.ModuleType):
    """The ``time`` module, whose ``sleep`` in an installed reactor thread waits for work."""

    def __init__(self) -> None:
        super().__init__("time")

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        thread = threading.current_thread()
        if isinstance(thread, DULServiceProvider):
            waker = getattr(thread, "_pacs_triage_waker", None)
            if waker is not None and seconds == thread._run_loop_delay:
                waker.wait(seconds)
                return
        elif isinstance(thread, Association) and seconds == _ASSOCIATION_SLEEP:
            waker = getattr(thread, "_pacs_triage_wake", None)
            if waker is not None:
                waker.wait()
                return
        time.sleep(seconds)


_TIME = _ReactorTime()


def _patch_modules() -> None:
    for module in (pynetdicom.dul, pynetdicom.association):
        if getattr(module, "time", None) is not _TIME:
            assert getattr(module, "time", None) is time, f"{module.__name__}.time is not the time module"
            setattr(module, "time", _TIME)  # noqa: B010 - mypy does not see the module's import


def install(assoc: Association) -> None:
    """Make ``assoc``'s two reactors wait for work; call before its threads start."""
    _patch_modules()
    dul = assoc.dul
    waker = _DulWaker(dul)
    assoc_waker = _AssociationWaker()
    # Items already queued (the transport-connection event, Evt5) move to the new queues.
    dul.event_queue = _WakingQueue(waker.wake, list(dul.event_queue.queue))
    dul.to_provider_queue = _WakingQueue(waker.wake, list(dul.to_provider_queue.queue))
    dul.to_user_queue = _WakingQueue(assoc_waker.wake, list(dul.to_user_queue.queue))
    assoc.dimse.msg_queue = _WakingQueue(assoc_waker.wake, list(assoc.dimse.msg_queue.queue))
    dul._pacs_triage_waker = waker  # type: ignore[attr-defined]
    assoc._pacs_triage_wake = assoc_waker  # type: ignore[attr-defined]
