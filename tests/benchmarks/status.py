"""``pacs-triage status`` on a large database: the command's wall time with 100,000 instance rows.

    .venv/bin/python -m tests.benchmarks.status [--instances 100000] [--rounds 5] [--no-postgresql]

A script, not a test (tests never assert on wall-clock time).

A fresh database (SQLite in a temporary directory; PostgreSQL in a new database on
127.0.0.1:5432 unless ``--no-postgresql``) is migrated to the current schema and seeded directly
with SQL: ``--instances`` instance rows in studies of 100 instances (one series each, one
association), a job per study (a mix of succeeded, queued, dead and failed), and a result and a
delivery per succeeded job. Then ``pacs-triage status`` runs ``--rounds`` times as a subprocess
(the operator's command, Python start-up and imports included), and ``status --json`` once to
check the counts it reports. Printed: median and max wall time, and the peer in the same run,
``pacs-triage --help`` (the same interpreter and imports, no database): the difference is what the
database part costs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, insert, text

from storage.db import make_engine
from storage.migrate import upgrade
from storage.models import Association, Delivery, Instance, Job, Result, Series, Study
from tests.support.process import clean_env, cli_command

PER_STUDY = 100
PG_ADMIN = "postgresql+psycopg://127.0.0.1:5432/test"
JOB_STATES = ("succeeded", "succeeded", "succeeded", "queued", "dead", "failed")


def seed(url: str, instances: int) -> None:
    engine = make_engine(url)
    upgrade(engine)
    now = dt.datetime.now(dt.UTC)
    studies = instances // PER_STUDY
    with engine.begin() as conn:
        conn.execute(
            insert(Association),
            [
                {
                    "id": "bench",
                    "calling_ae": "MODALITY",
                    "called_ae": "PACS_TRIAGE",
                    "source_address": "127.0.0.1",
                    "started_at": now,
                    "ended_at": now,
                    "released": True,
                }
            ],
        )
        conn.execute(
            insert(Study),
            [
                {
                    "id": s + 1,
                    "study_instance_uid": f"2.25.{s + 1}",
                    "state": "complete",
                    "first_received_at": now,
                    "last_received_at": now,
                    "completed_at": now,
                }
                for s in range(studies)
            ],
        )
        conn.execute(
            insert(Series),
            [
                {
                    "id": s + 1,
                    "study_id": s + 1,
                    "series_instance_uid": f"2.25.{s + 1}.1",
                    "modality": "CT",
                    "last_received_at": now,
                }
                for s in range(studies)
            ],
        )
        batch = 10_000
        for start in range(0, instances, batch):
            conn.execute(
                insert(Instance),
                [
                    {
                        "series_id": i // PER_STUDY + 1,
                        "sop_instance_uid": f"2.25.{uuid.uuid4().int}",
                        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
                        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                        "path": f"objects/ab/cd/{i}.dcm",
                        "size_bytes": 526_000,
                        "sha256": "0" * 64,
                        "calling_ae": "MODALITY",
                        "source_address": "127.0.0.1",
                        "association_id": "bench",
                        "received_at": now,
                    }
                    for i in range(start, min(start + batch, instances))
                ],
            )
        conn.execute(
            insert(Job),
            [
                {
                    "id": s + 1,
                    "study_id": s + 1,
                    "pipeline": "demo",
                    "priority": s % 3,
                    "state": JOB_STATES[s % len(JOB_STATES)],
                    "input_fingerprint": f"{s + 1:064x}",
                    "run_after": now,
                    "created_at": now,
                    "updated_at": now,
                    "last_error": "bench" if JOB_STATES[s % len(JOB_STATES)] in ("dead", "failed") else None,
                }
                for s in range(studies)
            ],
        )
        done = [s for s in range(studies) if JOB_STATES[s % len(JOB_STATES)] == "succeeded"]
        conn.execute(
            insert(Result),
            [
                {
                    "id": s + 1,
                    "job_id": s + 1,
                    "study_id": s + 1,
                    "input_fingerprint": f"{s + 1:064x}",
                    "sop_class_uid": "1.2.840.10008.5.1.4.1.1.88.22",
                    "sop_instance_uid": f"2.25.9{s + 1}",
                    "series_instance_uid": f"2.25.8{s + 1}",
                    "path": f"results/{s}.dcm",
                    "size_bytes": 1000,
                    "sha256": "0" * 64,
                    "created_at": now,
                }
                for s in done
            ],
        )
        conn.execute(
            insert(Delivery),
            [
                {
                    "result_id": s + 1,
                    "destination": "pacs",
                    "peer": "PACS@10.0.0.1:104",
                    "state": "delivered",
                    "run_after": now,
                    "created_at": now,
                    "updated_at": now,
                    "delivered_at": now,
                }
                for s in done
            ],
        )
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("ANALYZE"))
    engine.dispose()


def run(args: list[str], home: Path, url: str, command: list[str] | None = None) -> tuple[float, float]:
    """Wall time and CPU time (user + system, the child's own) of one run."""
    env = clean_env({"PACS_TRIAGE_HOME": str(home), "PACS_TRIAGE_DATABASE_URL": url})
    cpu_before = _children_cpu()
    started = time.perf_counter()
    out = subprocess.run(
        [*(command or cli_command()), *args], env=env, capture_output=True, text=True, timeout=120
    )
    elapsed = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(f"pacs-triage {' '.join(args)} failed: {out.stderr}")
    return elapsed, _children_cpu() - cpu_before


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(name: str, url: str, home: Path, instances: int, rounds: int) -> dict[str, object]:
    t0 = time.perf_counter()
    seed(url, instances)
    seeded = time.perf_counter() - t0
    env = clean_env({"PACS_TRIAGE_HOME": str(home), "PACS_TRIAGE_DATABASE_URL": url})
    report = json.loads(
        subprocess.run(
            [*cli_command(), "status", "--json"], env=env, capture_output=True, text=True, check=True
        ).stdout
    )
    assert report["instances"] == instances, report["instances"]
    run(["status"], home, url)  # warm the page cache and the interpreter's bytecode
    status = [run(["status"], home, url) for _ in range(rounds)]
    helps = [run(["--help"], home, url) for _ in range(rounds)]
    bare = [run(["-c", "pass"], home, url, command=[sys.executable]) for _ in range(rounds)]
    return {
        "database": name,
        "instances": report["instances"],
        "studies": report["studies"],
        "seed_s": seeded,
        "status_median": statistics.median(w for w, _ in status),
        "status_max": max(w for w, _ in status),
        "status_cpu": statistics.median(c for _, c in status),
        "help_median": statistics.median(w for w, _ in helps),
        "help_cpu": statistics.median(c for _, c in helps),
        "python_median": statistics.median(w for w, _ in bare),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-postgresql", action="store_true")
    options = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="status-bench-") as tmp:
        home = Path(tmp)
        rows.append(
            measure("sqlite", f"sqlite:///{home / 'bench.db'}", home, options.instances, options.rounds)
        )
        if not options.no_postgresql:
            name = f"bench_{uuid.uuid4().hex[:10]}"
            admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
            try:
                url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
                rows.append(measure("postgresql", url, home, options.instances, options.rounds))
            finally:
                with admin.connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                admin.dispose()
    print(
        f"python {platform.python_version()}, {sys.platform}, rounds {options.rounds}, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(
        "| database | instances | `status` wall, median (max) s | `status` CPU s | `--help` wall s | "
        "`--help` CPU s | bare `python -c pass` wall s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['database']} | {r['instances']:,} | {r['status_median']:.2f} ({r['status_max']:.2f}) | "
            f"{r['status_cpu']:.2f} | {r['help_median']:.2f} | {r['help_cpu']:.2f} | {r['python_median']:.2f} |"
        )


if __name__ == "__main__":
    main()
