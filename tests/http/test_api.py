"""The REST API against a running ``serve``: studies, jobs, deliveries, bulk retry, audit events.

A study goes in over DICOM (dcmtk storescu); the test then acts as the worker through the real
queue API, so every state the API acts on is one the service really reached. Every mutating call is
made twice (idempotent: the second changes nothing) and leaves an audit row naming the token.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, select

from storage.models import Delivery, Event, Job
from storage.outbox import Destination
from tests.support.http import (
    HEAD_CT,
    MR,
    HttpNode,
    as_worker,
    queued_job,
    start_http_node,
    study_uid,
)
from tests.support.peers import storescu

pytestmark = pytest.mark.peer


def _send(node: HttpNode, files: list[Path]) -> str:
    out = storescu(node.service.port, files)
    assert out.returncode == 0, out.stderr
    return study_uid(files)


def _events(database_url: str, entity: str, entity_id: int) -> list[tuple[str, str]]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return [
                (kind, detail)
                for kind, detail in conn.execute(
                    select(Event.kind, Event.detail)
                    .where(Event.entity == entity, Event.entity_id == str(entity_id))
                    .order_by(Event.id)
                )
            ]
    finally:
        engine.dispose()


def _row_state(database_url: str, model: type[Job] | type[Delivery], row_id: int) -> str:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return str(conn.execute(select(model.state).where(model.id == row_id)).scalar_one())
    finally:
        engine.dispose()


def _twice(client: httpx.Client, path: str) -> tuple[dict, dict]:  # type: ignore[type-arg]
    first, second = client.post(path), client.post(path)
    assert first.status_code == 200, first.text
    assert second.status_code == 200, second.text
    return first.json(), second.json()


def test_studies_jobs_deliveries_and_audit(
    http_nodes: list[HttpNode], tmp_path: Path, database_url: str
) -> None:
    node = start_http_node(tmp_path, database_url=database_url)
    http_nodes.append(node)
    db = node.service.database_url
    admin, reader = node.admin, node.reader

    # Study 1 succeeds with an URGENT result that goes to one destination.
    uid1 = _send(node, HEAD_CT)
    job1 = queued_job(db, uid1)
    as_worker(
        db,
        job1,
        succeed=True,
        priority=1,
        summary="lesion 12.3 mL (p=0.91)\nsecond finding",
        destinations=[Destination(name="pacs", peer="PACS@127.0.0.1:1")],
    )
    # Study 2 dies.
    uid2 = _send(node, MR)
    job2 = queued_job(db, uid2)
    as_worker(db, job2, succeed=False)

    # The worklist: URGENT first, then the study without a result.
    studies = reader.get("/api/v1/studies").json()
    assert [s["study_instance_uid"] for s in studies] == [uid1, uid2]
    top = studies[0]
    assert top["priority"] == "urgent" and top["main_finding"] == "lesion 12.3 mL (p=0.91)"
    assert top["instance_count"] == len(HEAD_CT) and top["series_count"] == 1
    assert top["job_state"] == "succeeded"
    assert top["time_to_result_seconds"] is None, "unknown while its delivery is still due"
    assert studies[1]["priority"] is None and studies[1]["job_state"] == "dead"

    # Filters: priority, pipeline, state, date.
    assert [s["id"] for s in reader.get("/api/v1/studies", params={"priority": "urgent"}).json()] == [
        top["id"]
    ]
    assert reader.get("/api/v1/studies", params={"priority": "stat"}).json() == []
    assert len(reader.get("/api/v1/studies", params={"pipeline": "echo"}).json()) == 2
    assert reader.get("/api/v1/studies", params={"pipeline": "nope"}).json() == []
    assert len(reader.get("/api/v1/studies", params={"state": "complete"}).json()) == 2
    assert reader.get("/api/v1/studies", params={"state": "receiving"}).json() == []
    today = top["first_received_at"][:10]
    assert len(reader.get("/api/v1/studies", params={"date": today}).json()) == 2
    assert reader.get("/api/v1/studies", params={"date": "2001-01-01"}).json() == []
    assert reader.get("/api/v1/studies", params={"state": "bogus"}).status_code == 422
    by_uid = reader.get("/api/v1/studies", params={"study_instance_uid": uid2}).json()
    assert [s["study_instance_uid"] for s in by_uid] == [uid2]
    assert reader.get("/api/v1/studies", params={"accession_number": "NOPE"}).json() == []

    # Study detail: series, counts, jobs, results, findings, deliveries, timeline.
    detail = reader.get(f"/api/v1/studies/{top['id']}").json()
    assert detail["series"][0]["instance_count"] == len(HEAD_CT)
    assert [j["id"] for j in detail["jobs"]] == [job1]
    assert detail["findings"] == ["lesion 12.3 mL (p=0.91)", "second finding"]
    assert detail["results"][0]["priority"] == "urgent"
    assert [d["state"] for d in detail["deliveries"]] == ["pending"]
    kinds = [(e["entity"], e["kind"]) for e in detail["timeline"]]
    assert ("job", "queued") in kinds and ("job", "running") in kinds and ("job", "succeeded") in kinds
    assert ("delivery", "pending") in kinds or ("result", "created") in kinds
    assert reader.get("/api/v1/studies/999999").status_code == 404

    # Jobs: list, filter, show.
    assert {j["id"] for j in reader.get("/api/v1/jobs").json()} == {job1, job2}
    assert [j["id"] for j in reader.get("/api/v1/jobs", params={"state": "dead"}).json()] == [job2]
    shown = reader.get(f"/api/v1/jobs/{job1}").json()
    assert shown["job"]["state"] == "succeeded" and len(shown["deliveries"]) == 1
    assert [e["kind"] for e in shown["history"]][:2] == ["queued", "running"]
    assert reader.get("/api/v1/jobs/424242").status_code == 404

    # Retry the dead job (twice: the second is a no-op), then cancel it (twice).
    first, second = _twice(admin, f"/api/v1/jobs/{job2}/retry")
    assert (first["changed"], first["job"]["state"]) == (True, "queued")
    assert (second["changed"], second["job"]["state"]) == (False, "queued")
    assert _row_state(db, Job, job2) == "queued"
    first, second = _twice(admin, f"/api/v1/jobs/{job2}/cancel")
    assert (first["changed"], second["changed"]) == (True, False)
    assert _row_state(db, Job, job2) == "cancelled"
    audits = [d for k, d in _events(db, "job", job2) if k == "operator"]
    assert len(audits) == 4 and all('"by": "ops-admin"' in d for d in audits)
    # A succeeded job cannot be retried (re-run it instead): 409 with the reason.
    refused = admin.post(f"/api/v1/jobs/{job1}/retry")
    assert refused.status_code == 409 and "re-run" in refused.json()["detail"]

    # Deliveries: list, send now (pending, due now), cancel, retry.
    deliveries = reader.get("/api/v1/deliveries").json()
    assert len(deliveries) == 1 and deliveries[0]["state"] == "pending"
    delivery = deliveries[0]["id"]
    assert admin.post(f"/api/v1/deliveries/{delivery}/send-now").status_code == 200
    first, second = _twice(admin, f"/api/v1/deliveries/{delivery}/cancel")
    assert (first["delivery"]["state"], first["changed"], second["changed"]) == ("cancelled", True, False)
    assert _row_state(db, Delivery, delivery) == "cancelled"
    first, second = _twice(admin, f"/api/v1/deliveries/{delivery}/retry")
    assert (first["delivery"]["state"], first["changed"], second["changed"]) == ("pending", True, False)
    assert _row_state(db, Delivery, delivery) == "pending"
    assert reader.get("/api/v1/deliveries", params={"state": "pending"}).json()[0]["id"] == delivery
    delivery_audits = [d for k, d in _events(db, "delivery", delivery) if k == "operator"]
    assert len(delivery_audits) == 5 and all('"by": "ops-admin"' in d for d in delivery_audits)

    # Re-run the succeeded job: its result and delivery are replaced when it runs again.
    first, second = _twice(admin, f"/api/v1/jobs/{job1}/rerun")
    assert (first["job"]["state"], first["changed"], second["changed"]) == ("queued", True, False)
    assert _row_state(db, Job, job1) == "queued"
    assert reader.get("/api/v1/deliveries").json() == []

    # Bulk retry of everything dead: the re-run job dies this time, then comes back.
    as_worker(db, job1, succeed=False)
    bulk = admin.post("/api/v1/dead/retry")
    assert bulk.status_code == 200 and bulk.json() == {"jobs": [job1], "deliveries": []}
    assert _row_state(db, Job, job1) == "queued"
    assert admin.post("/api/v1/dead/retry").json() == {"jobs": [], "deliveries": []}

    # The audit log over the API, filtered and paged.
    events = reader.get("/api/v1/events", params={"kind": "operator", "limit": 3}).json()
    assert len(events) == 3 and events[0]["id"] > events[1]["id"] > events[2]["id"]
    assert events[0]["detail"]["by"] == "ops-admin" and events[0]["detail"]["action"] == "retry_all_dead"
    older = reader.get("/api/v1/events", params={"kind": "operator", "before_id": events[-1]["id"]}).json()
    assert older and all(e["id"] < events[-1]["id"] for e in older)
    job_events = reader.get("/api/v1/events", params={"entity": "job", "entity_id": str(job1)}).json()
    assert {e["kind"] for e in job_events} >= {"queued", "running", "succeeded", "dead", "operator"}
