"""The HTTP server of ``serve``: uvicorn in a thread, started after the node is open, stopped first.

uvicorn installs no signal handlers outside the main thread, so ``serve`` keeps SIGTERM and tells
the server to finish its requests and close (``stop``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import uvicorn

from daemon.config import Config
from daemon.http.app import create_app
from daemon.http.auth import Sessions, TokenFileError, Tokens, ensure_token_file, session_key
from daemon.service.node import Node

log = logging.getLogger(__name__)

START_SECONDS = 15.0
STOP_SECONDS = 10.0


class HttpStartError(Exception):
    """The HTTP server could not start (port taken, bad certificate); the message says which."""


class HttpServer:
    """Owns the uvicorn server and its thread."""

    def __init__(self, config: Config, node: Node) -> None:
        self.config = config
        http = config.http
        tokens = http.tokens
        self.token_note = f"{len(tokens)} configured token(s)"
        if not tokens:
            token, path, created = ensure_token_file(config)
            tokens = (token,)
            self.token_note = f"admin token {'created in' if created else 'in'} {path}"
        app = create_app(
            node, Tokens(tokens), Sessions(session_key(config), max_age_seconds=http.session_hours * 3600)
        )
        tls = http.certificate is not None
        self.scheme = "https" if tls else "http"
        self.server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=http.host,
                port=http.port,
                ssl_certfile=str(http.certificate) if tls else None,
                ssl_keyfile=str(http.private_key) if tls else None,
                lifespan="off",
                access_log=False,
                log_level="warning",
                log_config=None,  # keep the service's logging setup
                server_header=False,
            )
        )
        self.thread = threading.Thread(target=self._run, name="http", daemon=True)
        self._error: SystemExit | OSError | None = None

    def _run(self) -> None:
        try:
            self.server.run()
        except (SystemExit, OSError) as exc:  # uvicorn exits on a bind or TLS error; start() reports it
            self._error = exc

    @property
    def port(self) -> int:
        """The bound port (differs from the configured one when that was 0)."""
        for server in self.server.servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return self.config.http.port

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + START_SECONDS
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.server.should_exit = True
                # uvicorn logged the cause (address in use, unreadable certificate) and exited.
                reason = f" ({self._error})" if isinstance(self._error, OSError) else ""
                raise HttpStartError(
                    f"HTTP server could not listen on {self.config.http.listen}{reason}: is the port in use "
                    "(see the error above)? Set http.listen (PACS_TRIAGE_HTTP__LISTEN) or http.enabled = false"
                )
            time.sleep(0.02)
        host = self.config.http.host
        shown = f"[{host}]" if ":" in host else host
        log.info("HTTP API and pages on %s://%s:%d (%s)", self.scheme, shown, self.port, self.token_note)

    def stop(self) -> None:
        """Finish the requests in flight and close (bounded)."""
        if not self.thread.is_alive():
            return
        self.server.should_exit = True
        self.thread.join(STOP_SECONDS)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(STOP_SECONDS)


def http_addons(config: Config) -> tuple[Callable[[Node], HttpServer], ...]:
    """What ``serve`` should run for ``[http]``: the server, or nothing when ``http.enabled`` is false."""
    if not config.http.enabled:
        return ()
    return (lambda node: HttpServer(config, node),)


__all__ = ["HttpServer", "HttpStartError", "TokenFileError", "http_addons"]
