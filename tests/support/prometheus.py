"""A real Prometheus (Debian package ``prometheus``) on loopback, in a temporary directory, and PromQL.

``running_prometheus`` starts it with a scrape configuration for the given ``/metrics`` targets
(scraped every second) and stops it after; ``Prometheus.query`` runs an instant PromQL query
through its HTTP API. Missing binary: skipped locally, a failure in CI (``need_tool``).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support.peers import free_port, need_peer
from tests.support.process import wait_until


@dataclass
class Prometheus:
    base_url: str
    log_path: Path

    def query(self, promql: str) -> list[tuple[dict[str, str], float]]:
        """An instant query: (labels, value) of each series."""
        response = httpx.get(self.base_url + "/api/v1/query", params={"query": promql}, timeout=10.0)
        response.raise_for_status()
        body = response.json()
        assert body["status"] == "success", body
        return [(item["metric"], float(item["value"][1])) for item in body["data"]["result"]]

    def value(self, promql: str) -> float | None:
        """The single value of a query that yields one series, or None while it yields none."""
        result = self.query(promql)
        assert len(result) <= 1, f"{promql} gave several series: {result}"
        return result[0][1] if result else None

    def targets_up(self) -> bool:
        body = httpx.get(self.base_url + "/api/v1/targets", timeout=10.0).json()
        active = body["data"]["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    need_peer(path is not None, "prometheus (Debian package prometheus)")
    assert path is not None
    return path


def promtool_binary() -> str:
    path = shutil.which("promtool")
    need_peer(path is not None, "promtool (Debian package prometheus)")
    assert path is not None
    return path


@contextlib.contextmanager
def running_prometheus(workdir: Path, targets: Sequence[str]) -> Iterator[Prometheus]:
    """Prometheus scraping ``targets`` (``HOST:PORT``, path ``/metrics``) every second."""
    binary = prometheus_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    quoted = ", ".join(f"'{t}'" for t in targets)
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: pacs-triage\n    scrape_timeout: 1s\n"
        f"    static_configs:\n      - targets: [{quoted}]\n"
    )
    port = free_port()
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--web.enable-lifecycle",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
    prometheus = Prometheus(base_url=f"http://127.0.0.1:{port}", log_path=log_path)

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError("prometheus exited:\n" + prometheus.log_text()[-3000:])
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(prometheus.base_url + "/-/ready", timeout=2.0).status_code == 200
        return False

    try:
        wait_until(ready, timeout=60, what="prometheus to be ready", interval=0.2)
        yield prometheus
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
