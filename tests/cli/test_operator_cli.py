"""Issue 12 item 8: the operator's read-only commands and the gaps, as the real ``pacs-triage`` program.

On SQLite and PostgreSQL: ``studies list``/``show`` with the triage result, ``jobs show`` with its
results, ``deliveries send-now``, ``jobs retry --all-dead``, ``db backup``; read-only commands never
create or migrate a database; a wrong database URL is one line and exit 2.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from sqlalchemy import select

from storage.migrate import current_revision, head_revision, upgrade
from storage.models import Delivery, DeliveryState, Event, JobState, StudyState
from storage.outbox import Destination, Outbox
from storage.queue import JobQueue, NewResult
from storage.retry import Backoff
from tests.support.process import clean_env, run_cli
from tests.support.queue_db import Db, add_job
from vocabulary import Priority

FINDINGS = "liver lesion 12.4 mL (largest 31 mm)\nlesion present: probability 0.97"


def cli(db_url: str, home: Path, *args: str, code: int = 0, env: dict[str, str] | None = None) -> str:
    settings = {
        "PACS_TRIAGE_HOME": str(home),
        "PACS_TRIAGE_DATABASE_URL": db_url,
        "PACS_TRIAGE_LOGGING__LEVEL": "WARNING",
        **(env or {}),
    }
    out = run_cli(*args, env=clean_env(settings))
    assert out.returncode == code, out.stdout + out.stderr
    return out.stdout + out.stderr


def _succeeded_job(db: Db, *, delivery_dies: bool) -> tuple[int, int]:
    """A job that succeeded with a STAT result and one delivery (dead when ``delivery_dies``)."""
    queue = JobQueue(db.sessions)
    job_id = add_job(db)
    claim = queue.claim("w")
    assert claim is not None and claim.job.id == job_id
    assert queue.succeed(
        claim,
        [
            NewResult(
                sop_class_uid="1.2.840.10008.5.1.4.1.1.88.22",
                sop_instance_uid=f"2.25.{job_id}0001",
                series_instance_uid=f"2.25.{job_id}0002",
                path="results/x.dcm",
                size_bytes=1,
                sha256="0" * 64,
                priority=int(Priority.STAT),
                summary=FINDINGS,
            )
        ],
        [Destination(name="pacs", peer="PACS@10.0.0.1:104")],
        delivery_max_attempts=1,
        stage_seconds={"load": 1.5, "inference": 12.0},
    )
    with db.sessions() as session:
        delivery_id = session.scalars(select(Delivery.id).order_by(Delivery.id.desc())).first()
    assert delivery_id is not None
    if delivery_dies:
        outbox = Outbox(db.sessions, backoff=Backoff(jitter=0))
        sending = outbox.claim("d")
        assert sending is not None
        outbox.failed(sending, "could not associate with PACS@10.0.0.1:104")
    return job_id, delivery_id


def test_studies_and_jobs_show_the_triage_result(db: Db, tmp_path: Path) -> None:
    job_id, _ = _succeeded_job(db, delivery_dies=False)
    routine = add_job(db)  # a second study, still queued: no result yet, listed after
    listed = json.loads(cli(db.url, tmp_path, "studies", "list", "--json"))
    assert [s["job_id"] for s in listed] == [job_id, routine]
    assert (
        listed[0]["priority"] == int(Priority.STAT) and listed[0]["main_finding"] == FINDINGS.splitlines()[0]
    )
    assert listed[1]["priority"] is None
    table = cli(db.url, tmp_path, "studies", "list")
    assert "stat" in table.splitlines()[1] and "liver lesion 12.4 mL" in table.splitlines()[1]
    only_stat = json.loads(cli(db.url, tmp_path, "studies", "list", "--json", "--priority", "stat"))
    assert [s["job_id"] for s in only_stat] == [job_id]

    study_id = listed[0]["id"]
    shown = cli(db.url, tmp_path, "studies", "show", str(study_id))
    assert "priority         STAT" in shown
    assert "- liver lesion 12.4 mL (largest 31 mm)" in shown and "- lesion present: probability 0.97" in shown
    assert "succeeded" in shown and "pacs (PACS@10.0.0.1:104)" in shown and "timeline (UTC):" in shown
    by_uid = json.loads(cli(db.url, tmp_path, "studies", "show", listed[0]["study_instance_uid"], "--json"))
    assert by_uid["findings"] == FINDINGS.splitlines() and by_uid["study"]["id"] == study_id
    assert "no study 999999" in cli(db.url, tmp_path, "studies", "show", "999999", code=1)

    job = cli(db.url, tmp_path, "jobs", "show", str(job_id))
    assert "results:" in job and "priority STAT" in job and "- liver lesion 12.4 mL" in job
    assert '"inference": 12.0' in job  # the stage timings, from the success's audit row
    as_json = json.loads(cli(db.url, tmp_path, "jobs", "show", str(job_id), "--json"))
    assert [r["summary"] for r in as_json["results"]] == [FINDINGS]


def test_send_now_and_retry_all_dead(db: Db, tmp_path: Path) -> None:
    _, delivery_id = _succeeded_job(db, delivery_dies=True)
    dead_job = add_job(db, max_attempts=1)
    queue = JobQueue(db.sessions)
    claim = queue.claim("w")
    assert claim is not None and claim.job.id == dead_job
    assert queue.fail(claim, "TimeoutError: model took too long", permanent=False) is JobState.DEAD

    out = cli(db.url, tmp_path, "deliveries", "send-now", str(delivery_id))
    assert f"delivery {delivery_id}" in out and "due now" in out
    assert "nothing to do" in cli(db.url, tmp_path, "deliveries", "send-now", str(delivery_id))
    with db.sessions() as session:
        assert session.get_one(Delivery, delivery_id).state == DeliveryState.PENDING
        audit = session.scalars(
            select(Event.detail).where(Event.entity == "delivery", Event.kind == "operator")
        ).all()
    assert audit and all('"by": "cli"' in d for d in audit)

    # Kill the delivery again, then retry everything dead at once.
    with db.sessions.begin() as session:
        session.get_one(Delivery, delivery_id).state = DeliveryState.DEAD
    out = cli(db.url, tmp_path, "jobs", "retry", "--all-dead")
    assert f"1 dead job(s) [{dead_job}]" in out and f"1 dead deliveries [{delivery_id}]" in out
    assert queue.get(dead_job).state is JobState.QUEUED
    with db.sessions() as session:
        assert session.get_one(Delivery, delivery_id).state == DeliveryState.PENDING
    assert "0 dead job(s), 0 dead deliveries" in cli(db.url, tmp_path, "jobs", "retry", "--all-dead")
    assert "give a job id or --all-dead" in cli(db.url, tmp_path, "jobs", "retry", code=2)


def test_read_only_commands_never_migrate(database_url: str, tmp_path: Path) -> None:
    from storage.db import make_engine

    engine = make_engine(database_url)
    try:
        head = head_revision(engine)
        from alembic.script import ScriptDirectory

        from storage.migrate import alembic_config

        previous = ScriptDirectory.from_config(alembic_config(engine)).get_revision(head).down_revision
        assert isinstance(previous, str)
        upgrade(engine, previous)
        for args in (("status",), ("jobs", "list"), ("studies", "list"), ("deliveries", "list")):
            out = cli(database_url, tmp_path, *args, code=1)
            assert f"schema is at revision {previous}" in out and "`pacs-triage db upgrade`" in out, out
            assert "Traceback" not in out
        assert current_revision(engine) == previous  # untouched
        assert f"database at revision {head}" in cli(database_url, tmp_path, "db", "upgrade")
        assert "studies    0" in cli(database_url, tmp_path, "status")
    finally:
        engine.dispose()


def test_no_database_is_created_and_the_default_home_is_named(tmp_path: Path) -> None:
    fake_home = tmp_path / "user"
    env = clean_env({"HOME": str(fake_home), "PACS_TRIAGE_LOGGING__LEVEL": "WARNING"})
    for args in (("status",), ("studies", "list"), ("jobs", "show", "1")):
        out = run_cli(*args, env=env)
        assert out.returncode == 1, out.stdout + out.stderr
        default = fake_home / ".local" / "share" / "pacs-triage"
        assert f"using the default home {default}" in out.stderr
        assert f"no database at {default / 'pacs-triage.db'}" in out.stderr
    assert not fake_home.exists()  # nothing created: no directory, no database


def test_wrong_database_url_is_one_line_and_exit_2(tmp_path: Path) -> None:
    wrong = "postgresql://nobody@127.0.0.1:1/nothing"
    for args in (("serve",), ("status",), ("worker",), ("db", "upgrade")):
        out = run_cli(
            *args,
            env=clean_env(
                {
                    "PACS_TRIAGE_HOME": str(tmp_path / "home"),
                    "PACS_TRIAGE_DATABASE_URL": wrong,
                    "PACS_TRIAGE_PORT": "0",
                    "PACS_TRIAGE_HTTP__LISTEN": "127.0.0.1:0",
                    "PACS_TRIAGE_LOGGING__LEVEL": "WARNING",
                }
            ),
            timeout=60,
        )
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert out.returncode == 2, (args, out.stderr)
        assert len(lines) == 1 and lines[0].startswith("pacs-triage: cannot open the database"), (args, lines)
        assert "postgresql://nobody@127.0.0.1:1/nothing" in lines[0] and "Connection refused" in lines[0]


def test_db_backup_sqlite_and_postgresql_advice(db: Db, tmp_path: Path) -> None:
    job_id, _ = _succeeded_job(db, delivery_dies=False)
    target = tmp_path / "backup.db"
    if db.url.startswith("sqlite"):
        assert f"to {target}" in cli(db.url, tmp_path, "db", "backup", str(target))
        with sqlite3.connect(target) as copy:
            assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert copy.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()[0] == "succeeded"
            states = {s for (s,) in copy.execute("SELECT state FROM studies")}
        assert states == {StudyState.RECEIVING.value}
        assert "exists" in cli(db.url, tmp_path, "db", "backup", str(target), code=1)
    else:
        out = cli(db.url, tmp_path, "db", "backup", str(target), code=2)
        assert "pg_dump" in out and not target.exists()


def test_malformed_database_url_is_a_configuration_error(tmp_path: Path) -> None:
    """A URL the engine cannot parse (a port that is not a number, a SQLite URL with a host part):
    exit 2 naming the key and where it was set, no traceback, the password not repeated."""
    for wrong in ("postgresql://ops:s3cret@127.0.0.1:abc/pacs", "sqlite://relative.db"):
        for args in (("serve",), ("status",)):
            out = run_cli(
                *args,
                env=clean_env(
                    {"PACS_TRIAGE_HOME": str(tmp_path / "home"), "PACS_TRIAGE_DATABASE_URL": wrong}
                ),
                timeout=60,
            )
            assert out.returncode == 2, (wrong, args, out.stderr)
            assert "database_url:" in out.stderr and "PACS_TRIAGE_DATABASE_URL" in out.stderr
            assert "Traceback" not in out.stderr and "s3cret" not in out.stderr
    assert not (tmp_path / "home").exists()
