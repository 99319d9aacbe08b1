"""One HTTP endpoint shows the whole node: two receiver processes, two worker processes and the
dispatchers, all read from the database; a study goes through for real (storescu -> receivers ->
echo pipeline in a worker -> SR to dcmtk storescp) and the API shows its result and timeline.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.support.http import ADMIN_TOKEN, HEAD_CT, HttpNode, start_http_node, study_uid
from tests.support.peers import storescu
from tests.support.process import wait_until
from tests.support.storescp import Storescp

pytestmark = pytest.mark.peer

NODE = {
    "PACS_TRIAGE_DICOM__RECEIVERS": "2",
    "PACS_TRIAGE_WORKERS__COUNT": "2",
    "PACS_TRIAGE_WORKERS__POLL_SECONDS": "0.2",
    "PACS_TRIAGE_WORKERS__MAX_ATTEMPTS": "3",
    "PACS_TRIAGE_DISPATCH__THREADS": "1",
    "PACS_TRIAGE_DISPATCH__POLL_SECONDS": "0.2",
    # A hung component shows within seconds: beats every second, stale after 3.
    "PACS_TRIAGE_HTTP__HEARTBEAT_STALE_SECONDS": "3",
    "PACS_TRIAGE_WORKERS__LEASE_SECONDS": "3",
}


def _components(node: HttpNode) -> dict[str, Any]:
    components: dict[str, Any] = node.readyz().json()["components"]
    return components


def test_one_endpoint_shows_every_process_of_the_node(
    http_nodes: list[HttpNode], tmp_path: Path, storescp: Storescp
) -> None:
    storescp.start()
    node = start_http_node(tmp_path, env={**NODE, "PACS_TRIAGE_DESTINATION": storescp.destination})
    http_nodes.append(node)
    serve_pid = node.service.pid

    def two_fresh_workers() -> list[dict[str, Any]] | None:
        workers = _components(node)["workers"]
        fresh = [w for w in workers["data"]["items"] if w["fresh"]]
        return fresh if workers["ok"] and len(fresh) == 2 else None

    workers = wait_until(two_fresh_workers, timeout=120, what="two worker heartbeats", interval=0.5)
    pids = {w["pid"] for w in workers}
    assert len(pids) == 2 and serve_pid not in pids, "each worker process beats for itself"

    uid = study_uid(HEAD_CT)
    out = storescu(node.service.port, HEAD_CT)
    assert out.returncode == 0, out.stderr

    def delivered() -> dict[str, Any] | None:
        studies = node.reader.get("/api/v1/studies").json()
        if studies and studies[0]["time_to_result_seconds"] is not None:
            return dict(studies[0])
        return None

    study = wait_until(delivered, timeout=180, what="the study's result delivered", interval=0.5)
    assert study["study_instance_uid"] == uid and study["priority"] == "routine"
    assert study["job_state"] == "succeeded" and study["instance_count"] == len(HEAD_CT)
    detail = node.reader.get(f"/api/v1/studies/{study['id']}").json()
    assert [d["state"] for d in detail["deliveries"]] == ["delivered"]
    kinds = [(e["entity"], e["kind"]) for e in detail["timeline"]]
    for step in (("study", "complete"), ("job", "queued"), ("job", "running"), ("job", "succeeded")):
        assert step in kinds, step
    assert ("delivery", "delivered") in kinds
    # Where the time went, stage by stage; the stages add up to the time to result (both from the database).
    stages = {s["stage"]: s["seconds"] for s in detail["stages"]}
    assert any(name.startswith("queue wait") for name in stages) and any(
        n.startswith("sending") for n in stages
    )
    assert abs(sum(stages.values()) - study["time_to_result_seconds"]) < 0.01, (stages, study)
    page = node.client(token=None)
    page.post("/login", data={"token": ADMIN_TOKEN}, headers={"Origin": node.base_url})
    assert "Where the time went" in page.get(f"/studies/{study['id']}").text
    assert len(storescp.files()) == 1

    # Re-run the succeeded study: the worker runs it again, the same SR (same UIDs) is delivered again.
    first_sr = detail["results"][0]["sop_instance_uid"]
    rerun = node.admin.post(f"/api/v1/jobs/{study['job_id']}/rerun")
    assert rerun.status_code == 200 and rerun.json()["changed"], rerun.text

    def delivered_again() -> dict[str, Any] | None:
        again = node.reader.get(f"/api/v1/studies/{study['id']}").json()
        states = [d["state"] for d in again["deliveries"]]
        return again if again["study"]["job_state"] == "succeeded" and states == ["delivered"] else None

    again = wait_until(delivered_again, timeout=180, what="the re-run delivered", interval=0.5)
    assert [r["sop_instance_uid"] for r in again["results"]] == [first_sr]
    reruns = [e for e in again["timeline"] if e["detail"].get("reason") == "re-run by operator"]
    assert len(reruns) == 1 and reruns[0]["detail"]["by"] == "ops-admin"

    # A hung worker (SIGSTOP) makes the node not ready, naming it; it is ready again once the worker runs.
    hung = workers[1]["pid"]
    os.kill(hung, signal.SIGSTOP)
    try:

        def not_ready() -> dict[str, Any] | None:
            response = node.readyz()
            return response.json() if response.status_code == 503 else None

        body = wait_until(not_ready, timeout=60, what="readiness to notice the hung worker", interval=0.3)
        assert not body["components"]["workers"]["ok"] and "1 of 2" in body["components"]["workers"]["detail"]
        assert [w["pid"] for w in body["components"]["workers"]["data"]["items"] if not w["fresh"]] == [hung]
    finally:
        os.kill(hung, signal.SIGCONT)
    wait_until(lambda: node.readyz().status_code == 200, timeout=60, what="ready again", interval=0.3)

    # A worker killed with -9 is restarted with a new pid; its old row shows as silent, not as alive.
    victim = workers[0]["pid"]
    os.kill(victim, signal.SIGKILL)

    def replaced() -> list[dict[str, Any]] | None:
        items = _components(node)["workers"]["data"]["items"]
        fresh = {w["pid"] for w in items if w["fresh"]}
        return items if len(fresh) == 2 and victim not in fresh else None

    items = wait_until(replaced, timeout=180, what="the killed worker replaced", interval=0.5)
    assert any(w["pid"] == victim for w in items), "the dead worker's last heartbeat stays visible"
    ready = node.readyz()
    assert ready.status_code == 200, ready.text
