"""A test peer's server (a ``socketserver.TCPServer``) served from a daemon thread, optionally behind TLS."""

from __future__ import annotations

import contextlib
import socketserver
import ssl
import threading
from collections.abc import Iterator
from typing import Self


class ThreadedPeer:
    """Mixin for test peers: ``start()`` builds the server and calls :meth:`_serve`; ``stop()`` shuts it
    down and joins its thread; ``running()`` is both around a block."""

    _serving: tuple[socketserver.TCPServer, threading.Thread] | None = None

    def start(self) -> None:
        raise NotImplementedError

    def _serve(self, server: socketserver.TCPServer, name: str, tls: ssl.SSLContext | None) -> None:
        if tls is not None:
            server.socket = tls.wrap_socket(server.socket, server_side=True)
        thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)
        thread.start()
        self._serving = (server, thread)

    def stop(self) -> None:
        if self._serving is not None:
            server, thread = self._serving
            server.shutdown()
            server.server_close()
            thread.join()
            self._serving = None

    @contextlib.contextmanager
    def running(self) -> Iterator[Self]:
        self.start()
        try:
            yield self
        finally:
            self.stop()
