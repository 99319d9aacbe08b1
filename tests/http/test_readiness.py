"""``/readyz`` follows the real world: it flips to 503 when the spool turns read-only or PostgreSQL
stops, names the component, and comes back to 200 when they recover (``serve`` keeps running).

The spool is a tmpfs in the service's own mount namespace (remounted read-only with nsenter); the
database is a private PostgreSQL cluster the test starts with ``pg_ctl`` in a temporary directory
(the shared server on 5432 is never touched).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.http import HttpNode, start_http_node
from tests.support.peers import free_port, need_peer
from tests.support.process import wait_until

pytestmark = pytest.mark.peer


def _ready(node: HttpNode) -> tuple[int, dict[str, Any]]:
    response = node.readyz()
    body = response.json()
    assert set(body) == {"ready", "components"}
    assert body["ready"] == (response.status_code == 200)
    return response.status_code, body


def _wait_status(node: HttpNode, status: int, what: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        code, body = _ready(node)
        return body if code == status else None

    return wait_until(check, timeout=30, what=what, interval=0.2)


def test_readiness_follows_a_read_only_spool(http_nodes: list[HttpNode], tmp_path: Path) -> None:
    unshare, nsenter = shutil.which("unshare"), shutil.which("nsenter")
    need_peer(os.geteuid() == 0 and unshare is not None and nsenter is not None, "root with unshare/nsenter")
    spool = tmp_path / "spool"
    spool.mkdir()
    mount = 'mount -t tmpfs -o size=64m pacs-triage-spool "$0" && exec "$@"'
    prefix = [str(unshare), "--mount", "--propagation", "private", "sh", "-c", mount, str(spool)]
    node = start_http_node(tmp_path, prefix=prefix, spool=spool)
    http_nodes.append(node)

    def remount(options: str) -> None:
        cmd = ["nsenter", "-t", str(node.service.pid), "-m", "mount", "-o", f"remount,{options}", str(spool)]
        subprocess.run(cmd, check=True, capture_output=True)

    body = _wait_status(node, 200, "the node to be ready")
    assert all(c["ok"] for c in body["components"].values()), body
    assert body["components"]["disk"]["data"]["free_bytes"] > 0

    remount("ro")
    body = _wait_status(node, 503, "readiness to fail with a read-only spool")
    spool_state = body["components"]["spool"]
    assert not spool_state["ok"] and "not writable" in spool_state["detail"], spool_state
    assert body["components"]["database"]["ok"] and body["components"]["dicom_listener"]["ok"]

    remount("rw")
    body = _wait_status(node, 200, "readiness to recover with the spool writable again")
    assert body["components"]["spool"]["ok"]


@contextlib.contextmanager
def _private_postgres() -> Iterator[tuple[str, Any]]:
    """A throwaway PostgreSQL cluster on a free port, owned by the postgres user; yields its URL and pg_ctl."""
    binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    runuser = shutil.which("runuser")
    need_peer(
        bool(binaries) and runuser is not None and os.geteuid() == 0, "PostgreSQL server binaries (pg_ctl)"
    )
    bindir = Path(binaries[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="pacs-triage-pg-"))
    shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", free_port()

    def as_postgres(*args: str) -> None:
        subprocess.run(
            [str(runuser), "-u", "postgres", "--", *args], check=True, capture_output=True, timeout=120
        )

    def pg_ctl(action: str) -> None:
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        extra = ["-m", "fast"] if action == "stop" else ["-o", options, "-l", str(root / "log")]
        as_postgres(str(bindir / "pg_ctl"), "-D", str(data), "-w", *extra, action)

    try:
        as_postgres(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
        pg_ctl("start")
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres", pg_ctl
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            pg_ctl("stop")
        shutil.rmtree(root, ignore_errors=True)


def test_readiness_follows_postgresql_going_away_and_back(http_nodes: list[HttpNode], tmp_path: Path) -> None:
    with _private_postgres() as (url, pg_ctl):
        node = start_http_node(tmp_path, database_url=url)
        http_nodes.append(node)
        body = _wait_status(node, 200, "the node to be ready")
        assert body["components"]["database"]["detail"].startswith("reachable")

        pg_ctl("stop")
        body = _wait_status(node, 503, "readiness to fail with PostgreSQL stopped")
        database = body["components"]["database"]
        assert not database["ok"] and database["detail"].startswith("unreachable"), database
        assert not body["components"]["scheduler"]["ok"]  # heartbeats cannot be read
        assert node.service.alive()

        pg_ctl("start")
        body = _wait_status(node, 200, "readiness to recover with PostgreSQL back")
        assert all(c["ok"] for c in body["components"].values()), body
        assert node.service.alive()
