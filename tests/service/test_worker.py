"""Workers: errors classified at the boundary, input checked, SIGTERM finishes the job or gives it back."""

from __future__ import annotations

import json
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from daemon.config import load_config
from daemon.service.routing import CompletionSweep
from daemon.service.worker import Worker
from storage.models import JobState
from storage.queue import JobQueue
from storage.spool import Spool
from tests.support.process import clean_env, cli_command, wait_until
from tests.support.queue_db import Db, add_job, add_study, ct_series, ingest_files
from tests.support.stored import events


def worker(db: Db, tmp_path: Path, **env: str) -> Worker:
    config = load_config(
        environ={
            "PACS_TRIAGE_HOME": str(tmp_path / "home"),
            "PACS_TRIAGE_WORKERS__BACKOFF__BASE_SECONDS": "0",
            "PACS_TRIAGE_WORKERS__BACKOFF__JITTER": "0",
            **env,
        }
    )
    return Worker(config, db.sessions, Spool(config.spool_dir), Spool(config.results_dir), name="w")


def test_unknown_pipeline_fails_permanently(db: Db, tmp_path: Path) -> None:
    job_id = add_job(db, pipeline="monai_spleen", max_attempts=5)
    assert worker(db, tmp_path).run_one()
    job = JobQueue(db.sessions).get(job_id)
    assert job.state is JobState.FAILED and job.attempts == 1
    assert job.last_error is not None and "no pipeline named 'monai_spleen'" in job.last_error


def test_transient_errors_are_retried_then_dead(db: Db, tmp_path: Path) -> None:
    job_id = add_job(db, pipeline="echo", max_attempts=2)  # its files do not exist: transient
    w = worker(db, tmp_path)
    assert w.run_one() and w.run_one()
    assert not w.run_one()
    job = JobQueue(db.sessions).get(job_id)
    assert job.state is JobState.DEAD and job.attempts == 2
    assert job.last_error is not None and job.last_error.startswith(
        "SpoolUnavailable: spool file objects/none/"
    )


def test_a_study_that_changed_since_queued_is_given_back(db: Db, tmp_path: Path) -> None:
    study_id = add_study(db, "2.25.4242")
    job_id = add_job(db, study_id)
    add_study(db, "2.25.4242", series=(("CT", 1),))  # a late series, not yet completed
    assert worker(db, tmp_path).run_one()
    job = JobQueue(db.sessions).get(job_id)
    assert (job.state, job.attempts) == (JobState.QUEUED, 0)


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """Worker behaviour does not depend on the database; the queue is tested on both."""
    return f"sqlite:///{tmp_path / 'test.db'}"


@pytest.mark.parametrize(("grace", "expected"), [("0", JobState.QUEUED), ("30", JobState.SUCCEEDED)])
def test_sigterm_finishes_the_job_or_gives_the_lease_back(
    db: Db, tmp_path: Path, grace: str, expected: JobState
) -> None:
    env = {
        "PACS_TRIAGE_HOME": str(tmp_path / "home"),
        "PACS_TRIAGE_DATABASE_URL": db.url,
        "PACS_TRIAGE_PIPELINES__ECHO_DELAY_SECONDS": "2",
        "PACS_TRIAGE_WORKERS__POLL_SECONDS": "0.1",
        "PACS_TRIAGE_WORKERS__HEARTBEAT_SECONDS": "0.2",
        "PACS_TRIAGE_WORKERS__SHUTDOWN_GRACE_SECONDS": grace,
        "PACS_TRIAGE_STORAGE__MIN_FREE_BYTES": "0",
    }
    config = load_config(environ=env)
    spool = Spool(config.spool_dir)
    spool.open()
    study = f"2.25.{uuid.uuid4().int}"
    ingest_files(db, spool, ct_series(tmp_path / "in", study, study + ".1", 2))
    job_id = CompletionSweep(config, db.sessions, spool).force(study).job_id
    assert job_id is not None
    process = subprocess.Popen(
        [*cli_command(), "worker"], env=clean_env(env), stderr=subprocess.PIPE, text=True
    )
    try:
        wait_until(
            lambda: any(k == "running" for e, _, k, _ in events(db.url) if e == "job"),
            timeout=60,
            what="the worker to claim the job",
        )
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    job = JobQueue(db.sessions).get(job_id)
    assert job.state is expected and job.lease_owner is None
    if expected is JobState.QUEUED:
        last = [json.loads(d) for e, _, k, d in events(db.url) if e == "job"][-1]
        assert last["reason"] == "worker shut down before the job finished" and job.attempts == 0


def test_a_jobs_peak_memory_is_in_its_timeline(db: Db, tmp_path: Path) -> None:
    """Issue 15: the worker's peak resident memory during the run is recorded with the stage timings."""
    from daemon.service.timeline import job_timeline
    from storage.outbox import Outbox

    w = worker(db, tmp_path, PACS_TRIAGE_STORAGE__MIN_FREE_BYTES="0")
    w.spool.open()
    w.results.open()
    study = f"2.25.{uuid.uuid4().int}"
    ingest_files(db, w.spool, ct_series(tmp_path / "in", study, study + ".1", 2))
    job_id = CompletionSweep(w.config, db.sessions, w.spool).force(study).job_id
    assert job_id is not None
    assert w.run_one()
    queue = JobQueue(db.sessions)
    job = queue.get(job_id)
    assert job.state is JobState.SUCCEEDED, job.last_error
    timeline = job_timeline(queue, Outbox(db.sessions), job)
    assert timeline.peak_rss_mib is not None and timeline.peak_rss_mib > 10  # a Python process with pydicom
