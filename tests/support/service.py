"""A real pacs-triage service: ``pacs-triage serve`` as a subprocess or ``serve`` in a thread,
waited for with a deadline until C-ECHO succeeds."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.dicom.scu import Peer
from tests.support.dicom_bytes import DEFAULT_AE, echo_status
from tests.support.peers import free_port
from tests.support.process import clean_env, cli_command, run_cli, wait_until

READY_DEADLINE_S = 60.0


@dataclass
class Service:
    """A ``pacs-triage serve`` subprocess with its environment, data directory and log."""

    home: Path
    port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes]
    database_url: str
    spool: Path
    ae_title: str = DEFAULT_AE
    tls_port: int | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def peer(self) -> Peer:
        return Peer(self.ae_title, "127.0.0.1", self.port)

    @property
    def address(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def echo(self, timeout: float = 5.0) -> int | None:
        return echo_status(self.port, called_ae=self.ae_title, timeout=timeout)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = READY_DEADLINE_S) -> None:
        def ready() -> bool:
            if not self.alive():
                raise AssertionError(
                    f"pacs-triage serve exited with {self.process.returncode} before it was ready:\n"
                    + self.log_text()[-4000:]
                )
            return self.echo(timeout=2.0) == 0

        try:
            wait_until(ready, timeout=timeout, what=f"pacs-triage on port {self.port} to answer C-ECHO")
        except AssertionError:
            self.kill9()
            raise

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def kill9(self) -> None:
        if self.alive():
            self.process.kill()
        self.process.wait(timeout=30)

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run ``pacs-triage ARGS`` with the service's configuration (same environment)."""
        return run_cli(*args, env=self.env, timeout=timeout)

    def status_json(self) -> dict[str, Any]:
        out = self.cli("status", "--json")
        assert out.returncode == 0, out.stderr
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    def spool_view(self) -> Path:
        """The spool as the service sees it (through /proc when it runs in its own mount namespace)."""
        if self.alive():
            return Path(f"/proc/{self.pid}/root") / self.spool.relative_to("/")
        return self.spool


def start_service(
    workdir: Path,
    *,
    database_url: str | None = None,
    env: Mapping[str, str] | None = None,
    config: Path | None = None,
    prefix: Sequence[str] = (),
    port: int | None = None,
    home: Path | None = None,
    spool: Path | None = None,
    ae_title: str = DEFAULT_AE,
    tls_port: int | None = None,
    wait: bool = True,
    name: str = "service",
) -> Service:
    """Start ``pacs-triage serve`` (optionally under a ``prefix`` such as ``unshare ...``)."""
    home = home or workdir / "home"
    port = port or free_port()
    database_url = database_url or f"sqlite:///{home / 'pacs-triage.db'}"
    settings = {
        "PACS_TRIAGE_HOME": str(home),
        "PACS_TRIAGE_PORT": str(port),
        "PACS_TRIAGE_DATABASE_URL": database_url,
        "PACS_TRIAGE_STORAGE__MIN_FREE_BYTES": "0",
        "PACS_TRIAGE_LOGGING__LEVEL": "INFO",
        # Receiver tests need no analysis workers (each would import the ML stack on 2 cores).
        "PACS_TRIAGE_WORKERS__COUNT": "0",
        # Any free port: tests run side by side (tests/http/ picks its own and says so).
        "PACS_TRIAGE_HTTP__LISTEN": "127.0.0.1:0",
    }
    if spool is not None:
        settings["PACS_TRIAGE_STORAGE__SPOOL_DIR"] = str(spool)
    if ae_title != DEFAULT_AE:
        settings["PACS_TRIAGE_AE_TITLE"] = ae_title
    settings.update(env or {})
    full_env = clean_env(settings)
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{name}-{port}-{time.monotonic_ns()}.log"
    args = [*prefix, *cli_command(), "serve"]
    if config is not None:
        args += ["--config", str(config)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(args, env=full_env, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    service = Service(
        home=home,
        port=port,
        env=full_env,
        log_path=log_path,
        process=process,
        database_url=database_url,
        spool=spool or home / "spool",
        ae_title=ae_title,
        tls_port=tls_port,
    )
    if wait:
        service.wait_ready()
    return service


@dataclass
class ServiceFactory:
    """Starts services for one test and makes sure none outlives it."""

    workdir: Path
    database_url: str | None = None
    started: list[Service] = field(default_factory=list)

    def __call__(self, **kwargs: Any) -> Service:
        kwargs.setdefault("database_url", self.database_url)
        service = start_service(self.workdir, **kwargs)
        self.started.append(service)
        return service

    def cleanup(self) -> None:
        for service in self.started:
            if service.alive():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    service.stop(timeout=15)
            service.kill9()


class InProcessService:
    """``daemon.service.serve.serve`` in a thread (fast start; shares pynetdicom's globals with the test)."""

    def __init__(self, workdir: Path, database_url: str | None = None, **settings: str) -> None:
        from daemon.config import load_config

        self.home = workdir / "home"
        self.port = free_port()
        environ = clean_env(
            {
                "PACS_TRIAGE_HOME": str(self.home),
                "PACS_TRIAGE_PORT": str(self.port),
                "PACS_TRIAGE_STORAGE__MIN_FREE_BYTES": "0",
                "PACS_TRIAGE_WORKERS__COUNT": "0",
                **({"PACS_TRIAGE_DATABASE_URL": database_url} if database_url else {}),
                **settings,
            }
        )
        self.config = load_config(environ=environ)
        self.database_url = self.config.effective_database_url
        self.spool = self.config.spool_dir
        self.ae_title = self.config.ae_title
        self.ready = threading.Event()
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="pacs-triage-serve", daemon=True)

    def _run(self) -> None:
        from daemon.service.serve import serve

        try:
            serve(self.config, ready=self.ready, stop=self.stop_event)
        except BaseException as exc:  # surfaced by start()/stop()
            self.error = exc

    @property
    def peer(self) -> Peer:
        return Peer(self.ae_title, "127.0.0.1", self.port)

    def start(self, timeout: float = READY_DEADLINE_S) -> InProcessService:
        self.thread.start()
        wait_until(
            lambda: self.ready.is_set() or self.error is not None,
            timeout=timeout,
            what="the in-process receiver to start",
        )
        if self.error is not None:
            raise self.error
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self.stop_event.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the in-process receiver did not stop"
        if self.error is not None:
            raise self.error
