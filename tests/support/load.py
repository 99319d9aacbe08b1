"""Many jobs, many worker processes: shared by the concurrency test and ``tests/benchmarks/queue.py``."""

from __future__ import annotations

import datetime as dt
import signal
import subprocess
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select

from storage.completion import digest_of, input_fingerprint
from storage.db import make_engine, make_session_factory, transaction
from storage.events import add_event
from storage.migrate import upgrade
from storage.models import Event, Instance, Job, JobState, Series, Study, StudyState, utcnow
from storage.spool import Spool
from tests.support.process import clean_env, cli_command
from vocabulary import Priority


def seed_jobs(url: str, count: int, *, pipeline: str = "noop") -> None:
    """``count`` studies of one instance each (no files), each with a queued job, in one transaction."""
    engine = make_engine(url)
    try:
        upgrade(engine)
        sessions = make_session_factory(engine)
        now = utcnow()
        with transaction(sessions, "seeding jobs") as session:
            for i in range(count):
                uid = f"2.25.{uuid.uuid4().int}"
                study = Study(
                    study_instance_uid=uid,
                    state=StudyState.COMPLETE,
                    first_received_at=now,
                    last_received_at=now,
                    completed_at=now,
                )
                session.add(study)
                session.flush()
                series = Series(study_id=study.id, series_instance_uid=uid + ".1", last_received_at=now)
                session.add(series)
                session.flush()
                sha = uuid.uuid4().hex * 2
                session.add(
                    Instance(
                        series_id=series.id,
                        sop_instance_uid=uid + ".1.1",
                        sop_class_uid="1.2.3",
                        transfer_syntax_uid="1.2.840.10008.1.2.1",
                        path=f"objects/none/{i}.dcm",
                        size_bytes=1,
                        sha256=sha,
                        calling_ae="LOAD",
                        source_address="127.0.0.1",
                        received_at=now,
                    )
                )
                job = Job(
                    study_id=study.id,
                    pipeline=pipeline,
                    priority=int(Priority.ROUTINE),
                    state=JobState.QUEUED,
                    input_fingerprint=input_fingerprint(pipeline, digest_of([(uid + ".1.1", sha)])),
                    attempts=0,
                    max_attempts=3,
                    run_after=now,
                    created_at=now,
                    updated_at=now,
                )
                session.add(job)
                session.flush()
                add_event(session, "job", job.id, "queued")
    finally:
        engine.dispose()


def spool_inputs(url: str, root: Path) -> None:
    """A spool with a one-byte file for every instance row: a worker checks that it can read the
    spool and each input before it runs a pipeline (the noop pipeline reads nothing more)."""
    spool = Spool(root)
    spool.open()
    engine = make_engine(url, pool_size=1)
    try:
        with make_session_factory(engine)() as session:
            for path in session.scalars(select(Instance.path)):
                file = spool.path_of(path)
                file.parent.mkdir(parents=True, exist_ok=True)
                file.write_bytes(b"\0")
    finally:
        engine.dispose()


def start_workers(
    url: str, home: Path, count: int, *, lease_seconds: float = 60.0
) -> list[subprocess.Popen[str]]:
    """``count`` ``pacs-triage worker`` processes on ``url``, sharing the spool under ``home``."""
    spool_inputs(url, home / "spool")
    env = clean_env(
        {
            "PACS_TRIAGE_HOME": str(home),
            "PACS_TRIAGE_DATABASE_URL": url,
            "PACS_TRIAGE_STORAGE__MIN_FREE_BYTES": "0",
            "PACS_TRIAGE_WORKERS__POLL_SECONDS": "0.2",
            "PACS_TRIAGE_WORKERS__LEASE_SECONDS": str(lease_seconds),
            "PACS_TRIAGE_LOGGING__LEVEL": "WARNING",
        }
    )
    return [
        subprocess.Popen(
            [*cli_command(), "worker"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        for _ in range(count)
    ]


def counts(url: str) -> dict[str, int]:
    engine = make_engine(url, pool_size=1)
    try:
        with make_session_factory(engine)() as session:
            return {
                str(s): n for s, n in session.execute(select(Job.state, func.count()).group_by(Job.state))
            }
    finally:
        engine.dispose()


def wait_done(url: str, count: int, processes: list[subprocess.Popen[str]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while counts(url).get(JobState.SUCCEEDED.value, 0) < count:
        dead = [p for p in processes if p.poll() is not None]
        if dead:
            raise AssertionError(
                f"a worker exited early with {dead[0].returncode}: {dead[0].stderr.read()[-3000:]}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s: {counts(url)}")
        time.sleep(0.5)


def stop_workers(processes: list[subprocess.Popen[str]], timeout: float = 60.0) -> list[tuple[int, str]]:
    """SIGTERM every worker; returns (exit code, stderr) of each."""
    for p in processes:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    out = []
    for p in processes:
        _, err = p.communicate(timeout=timeout)
        out.append((p.returncode, err))
    return out


@dataclass(frozen=True)
class ClaimStats:
    claims_per_job: Counter[str]  # job id -> number of "running" events
    owners: Counter[str]  # worker process -> claims
    first_claim: dt.datetime
    last_success: dt.datetime

    @property
    def claims_per_second(self) -> float:
        return sum(self.claims_per_job.values()) / max(
            1e-9, (self.last_success - self.first_claim).total_seconds()
        )


def claim_stats(url: str) -> ClaimStats:
    import json

    engine = make_engine(url, pool_size=1)
    try:
        with make_session_factory(engine)() as session:
            running = session.execute(
                select(Event.entity_id, Event.detail, Event.at).where(
                    Event.entity == "job", Event.kind == "running"
                )
            ).all()
            last = session.scalar(
                select(func.max(Event.at)).where(Event.entity == "job", Event.kind == "succeeded")
            )
    finally:
        engine.dispose()
    owners = Counter(json.loads(detail)["owner"].rsplit("/", 1)[0] for _, detail, _ in running)
    assert last is not None
    return ClaimStats(
        Counter(job_id for job_id, _, _ in running), owners, min(at for _, _, at in running), last
    )
