"""``serve`` speaks systemd's notify protocol (``Type=notify``, ``WatchdogSec=``): READY=1 once it
receives and answers HTTP, WATCHDOG=1 while its supervision loop turns, STOPPING=1 on SIGTERM.

The test plays systemd: it binds the datagram socket named by ``NOTIFY_SOCKET`` and reads what
the real ``pacs-triage serve`` sends.
"""

from __future__ import annotations

import socket
from pathlib import Path

import httpx

from tests.support.peers import free_port
from tests.support.process import wait_until
from tests.support.service import ServiceFactory


def test_ready_watchdog_and_stopping(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(0.2)
    messages: list[str] = []

    def received(line: str) -> bool:
        try:
            messages.extend(listener.recv(4096).decode().splitlines())
        except TimeoutError:
            pass
        return line in messages

    http_port = free_port()
    services = ServiceFactory(tmp_path)
    try:
        service = services(
            wait=False,
            env={
                "NOTIFY_SOCKET": str(path),
                "WATCHDOG_USEC": "1000000",  # ping every 0.5 s
                "PACS_TRIAGE_HTTP__LISTEN": f"127.0.0.1:{http_port}",
            },
        )
        wait_until(lambda: received("READY=1"), timeout=60, what="READY=1 from serve")
        # READY means ready: DICOM and HTTP both answer now.
        assert service.echo() == 0
        assert httpx.get(f"http://127.0.0.1:{http_port}/healthz").status_code == 200
        assert any(m.startswith("STATUS=receiving as") for m in messages)
        assert f"MAINPID={service.pid}" in messages
        messages.clear()

        def pinged_twice() -> bool:
            received("")
            return messages.count("WATCHDOG=1") >= 2

        wait_until(pinged_twice, timeout=30, what="two watchdog pings")
        assert service.stop() == 0
        wait_until(lambda: received("STOPPING=1"), timeout=10, what="STOPPING=1")
    finally:
        services.cleanup()
        listener.close()
