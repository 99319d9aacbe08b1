"""A real ``pacs-triage serve`` with its HTTP side on a free loopback port, and an httpx client for it.

Tokens come from a TOML file (one admin, one read-only). Jobs are moved by the test acting as a
worker through the real queue API (``as_worker``): the service runs no worker processes, so no
ML stack is imported, and the test decides which job succeeds and which dies.
"""

from __future__ import annotations

import contextlib
import hashlib
import ssl
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from storage.db import make_engine, make_session_factory
from storage.models import Job, JobState, Study
from storage.outbox import Destination
from storage.queue import JobQueue, NewResult
from tests.paths import TESTDATA
from tests.support.peers import free_port
from tests.support.process import wait_until
from tests.support.service import Service, start_service

ADMIN_TOKEN = "admin-token-for-tests-0123456789"
READ_TOKEN = "read-token-for-tests-0123456789"
HEAD_CT = sorted((TESTDATA / "ct_series" / "gantry_tilt").glob("GE_0[1-3].dcm"))
MR = sorted((TESTDATA / "mr_series" / "sag_t1_fl2d_HFS").glob("001[0-2].dcm"))

FAST = {
    "PACS_TRIAGE_COMPLETION__QUIET_SECONDS": "0.2",
    "PACS_TRIAGE_COMPLETION__SWEEP_INTERVAL_SECONDS": "0.2",
    "PACS_TRIAGE_WORKERS__COUNT": "0",
    "PACS_TRIAGE_WORKERS__MAX_ATTEMPTS": "1",  # the first transient failure makes a job dead
    "PACS_TRIAGE_DISPATCH__THREADS": "0",  # deliveries stay where the test puts them
}


def tokens_toml(*, health_open: bool = True) -> str:
    read_digest = hashlib.sha256(READ_TOKEN.encode()).hexdigest()
    return (
        "[http]\n"
        + ("" if health_open else "health_open_to = []\n")
        + f'[[http.tokens]]\nname = "ops-admin"\nrole = "admin"\ntoken = "{ADMIN_TOKEN}"\n'
        + f'[[http.tokens]]\nname = "viewer"\nrole = "read"\ntoken_sha256 = "{read_digest}"\n'
    )


@dataclass
class HttpNode:
    """The service, its HTTP base URL and clients."""

    service: Service
    base_url: str
    verify: ssl.SSLContext | bool = True
    clients: list[httpx.Client] = field(default_factory=list)

    def client(self, token: str | None = ADMIN_TOKEN, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        headers.update(kwargs.pop("headers", {}))
        client = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=15.0, verify=self.verify, **kwargs
        )
        self.clients.append(client)
        return client

    @property
    def admin(self) -> httpx.Client:
        return self.client(ADMIN_TOKEN)

    @property
    def reader(self) -> httpx.Client:
        return self.client(READ_TOKEN)

    def readyz(self) -> httpx.Response:
        return httpx.get(self.base_url + "/readyz", timeout=15.0, verify=self.verify)

    def close(self) -> None:
        for c in self.clients:
            c.close()


def start_http_node(
    workdir: Path,
    *,
    database_url: str | None = None,
    env: Mapping[str, str] | None = None,
    prefix: Sequence[str] = (),
    spool: Path | None = None,
    configured_tokens: bool = True,
    health_open: bool = True,
    scheme: str = "http",
    verify: ssl.SSLContext | bool = True,  # trusts the test CA for HTTPS
) -> HttpNode:
    port = free_port()
    config = None
    settings = {**FAST, "PACS_TRIAGE_HTTP__LISTEN": f"127.0.0.1:{port}"}
    if configured_tokens:
        config = workdir / "pacs-triage.toml"
        config.write_text(tokens_toml(health_open=health_open))
    settings.update(env or {})
    service = start_service(
        workdir,
        database_url=database_url,
        env=settings,
        config=config,
        prefix=prefix,
        spool=spool,
        name="http",
    )
    node = HttpNode(service=service, base_url=f"{scheme}://127.0.0.1:{port}", verify=verify)

    def healthy() -> bool:
        if not service.alive():
            raise AssertionError("serve exited:\n" + service.log_text()[-4000:])
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(node.base_url + "/healthz", timeout=2.0, verify=verify).status_code in (200, 401)
        return False

    wait_until(healthy, timeout=30, what=f"HTTP on {node.base_url}")
    return node


@pytest.fixture
def http_nodes(tmp_path: Path) -> Iterator[list[HttpNode]]:
    """Start nodes with ``start_http_node(...)``, append them here; they are stopped after the test."""
    started: list[HttpNode] = []
    yield started
    for node in started:
        node.close()
        if node.service.alive():
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.service.stop(timeout=20)
        node.service.kill9()


# -- the test as a worker ---------------------------------------------------------------------------


def queued_job(database_url: str, study_instance_uid: str, timeout: float = 30.0) -> int:
    """Wait until the study was completed and its job queued; its id."""
    engine = make_engine(database_url)
    try:

        def find() -> int | None:
            with engine.connect() as conn:
                return conn.execute(
                    select(Job.id)
                    .join(Study, Study.id == Job.study_id)
                    .where(Study.study_instance_uid == study_instance_uid, Job.state == JobState.QUEUED)
                ).scalar()

        return wait_until(find, timeout=timeout, what=f"a queued job for study {study_instance_uid}")
    finally:
        engine.dispose()


def as_worker(
    database_url: str,
    job_id: int,
    *,
    succeed: bool,
    priority: int = 0,
    summary: str = "",
    destinations: Sequence[Destination] = (),
) -> None:
    """Claim ``job_id`` (it must be the only due job) and record a success with one result, or a
    transient failure (dead with ``workers.max_attempts = 1``)."""
    engine = make_engine(database_url)
    try:
        queue = JobQueue(make_session_factory(engine))
        claim = queue.claim("http-test-worker")
        assert claim is not None and claim.job.id == job_id, f"expected to claim job {job_id}, got {claim}"
        if not succeed:
            assert (
                queue.fail(claim, "PACS share unreachable (simulated by the test)", permanent=False)
                == JobState.DEAD
            )
            return
        uid = f"2.25.{int(hashlib.sha256(claim.job.input_fingerprint.encode()).hexdigest()[:30], 16)}"
        result = NewResult(
            sop_class_uid="1.2.840.10008.5.1.4.1.1.88.22",
            sop_instance_uid=uid,
            series_instance_uid=uid + ".1",
            path=f"results/{uid}.dcm",
            size_bytes=1234,
            sha256="0" * 64,
            priority=priority,
            summary=summary,
        )
        assert queue.succeed(claim, [result], destinations)
    finally:
        engine.dispose()


def study_uid(paths: Sequence[Path]) -> str:
    from pydicom import dcmread

    return str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
