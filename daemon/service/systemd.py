"""systemd's notify protocol (sd_notify(3)), without a dependency: READY, STATUS, WATCHDOG, STOPPING.

Under a ``Type=notify`` unit, systemd passes ``NOTIFY_SOCKET`` (and, with ``WatchdogSec=``,
``WATCHDOG_USEC``/``WATCHDOG_PID``) in the environment; these are systemd's, not configuration, so
they are read here and nowhere else. Without them every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends state lines to systemd; ``watchdog()`` pings at half the interval systemd asked for."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        address = environ.get("NOTIFY_SOCKET") or None
        if address is not None and address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace
        self.address = address
        self.watchdog_seconds: float | None = None
        usec, pid = environ.get("WATCHDOG_USEC"), environ.get("WATCHDOG_PID")
        if address and usec and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_seconds = int(usec) / 1e6 / 2
        self._last_ping = float("-inf")

    @classmethod
    def from_environment(cls) -> Notifier:
        return cls(os.environ)

    def send(self, *lines: str) -> None:
        if self.address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(self.address)
                sock.sendall("\n".join(lines).encode("utf-8"))
        except OSError as exc:  # systemd gone or socket not ours: the service itself goes on
            log.warning("cannot notify systemd at %s: %s", self.address.lstrip("\0"), exc)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def watchdog(self) -> None:
        if self.watchdog_seconds is None:
            return
        now = time.monotonic()
        if now - self._last_ping >= self.watchdog_seconds:
            self._last_ping = now
            self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping: letting in-flight stores and sends finish")
