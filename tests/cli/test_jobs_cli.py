"""The operator's commands, run as the real ``pacs-triage`` program."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from storage.models import JobState, StudyState
from storage.outbox import Destination, Outbox
from storage.queue import JobQueue, NewResult
from storage.retry import Backoff
from tests.support.process import clean_env, run_cli
from tests.support.queue_db import Db, add_job, add_study


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """The commands are database-agnostic; the queue they call is tested on both databases."""
    return f"sqlite:///{tmp_path / 'cli.db'}"


def cli(db: Db, tmp_path: Path, *args: str, code: int = 0) -> str:
    env = clean_env(
        {
            "PACS_TRIAGE_HOME": str(tmp_path / "home"),
            "PACS_TRIAGE_DATABASE_URL": db.url,
            "PACS_TRIAGE_LOGGING__LEVEL": "WARNING",
        }
    )
    out = run_cli(*args, env=env)
    assert out.returncode == code, out.stdout + out.stderr
    return out.stdout + out.stderr


def test_jobs_commands_and_status(db: Db, tmp_path: Path) -> None:
    queue = JobQueue(db.sessions)
    failed_id = add_job(db)
    dead_id = add_job(db, max_attempts=1)
    claim = queue.claim("w")
    assert claim is not None and claim.job.id == failed_id
    queue.fail(claim, "NoUsableSeries: no axial series with >= 64 slices", permanent=True)
    claim = queue.claim("w")
    assert claim is not None
    queue.fail(claim, "TimeoutError: model took too long", permanent=False)
    study = add_study(db, series=(("MR", 1),))
    with db.sessions.begin() as session:
        from storage.models import Study

        row = session.get_one(Study, study)
        row.state, row.route_detail = (
            StudyState.NOT_ROUTED,
            "no rule matched: ct: Modality 'MR' not in ['CT']",
        )
    # One result whose delivery died.
    ok = add_job(db)
    claim = queue.claim("w")
    assert claim is not None and claim.job.id == ok
    queue.succeed(
        claim,
        [
            NewResult(
                sop_class_uid="1.2",
                sop_instance_uid="2.25.5",
                series_instance_uid="2.25.6",
                path="objects/x.dcm",
                size_bytes=1,
                sha256="0" * 64,
            )
        ],
        [Destination(name="pacs", peer="PACS@10.0.0.1:104")],
        delivery_max_attempts=1,
    )
    outbox = Outbox(db.sessions, backoff=Backoff(jitter=0))
    sending = outbox.claim("d")
    assert sending is not None
    outbox.failed(sending, "could not associate with PACS@10.0.0.1:104")

    listed = json.loads(cli(db, tmp_path, "jobs", "list", "--json", "--state", "failed", "--state", "dead"))
    assert {(j["id"], j["state"]) for j in listed} == {(failed_id, "failed"), (dead_id, "dead")}
    shown = cli(db, tmp_path, "jobs", "show", str(dead_id))
    assert "TimeoutError: model took too long" in shown and "running" in shown and "dead" in shown

    status = cli(db, tmp_path, "status")
    assert "dead jobs: 1" in status and "TimeoutError" in status
    assert "dead deliveries: 1" in status and "PACS@10.0.0.1:104" in status
    assert "not routed studies: 1" in status and "Modality 'MR'" in status
    assert "oldest waiting job" in status

    assert f"job {dead_id} queued again" in cli(db, tmp_path, "jobs", "retry", str(dead_id))
    assert f"job {dead_id} cancelled" in cli(db, tmp_path, "jobs", "cancel", str(dead_id))
    assert "no job 4242" in cli(db, tmp_path, "jobs", "retry", "4242", code=1)
    assert "only failed, dead or cancelled" in cli(db, tmp_path, "jobs", "retry", str(ok), code=1)
    assert queue.get(dead_id).state is JobState.CANCELLED


def test_studies_complete_forces_completion(db: Db, tmp_path: Path) -> None:
    add_study(db, "2.25.777", released=None)  # its association is still open: not complete by itself
    out = cli(db, tmp_path, "studies", "complete", "2.25.777")
    assert "2.25.777: complete, job 1 queued" in out
    assert "no study 2.25.1 has been received" in cli(db, tmp_path, "studies", "complete", "2.25.1", code=1)
