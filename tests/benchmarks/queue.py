"""Queue benchmark: job claim throughput, and the time from association release to job queued.

    .venv/bin/python -m tests.benchmarks.queue [--jobs 500] [--studies 10] [--no-postgresql]

A script, not a test (tests never assert on wall-clock time).

1. **Claims.** ``--jobs`` jobs (one study of one instance each) are queued in a fresh database,
   then ``pacs-triage worker`` processes running the ``noop`` pipeline drain the queue. Each job
   is a full worker cycle: claim under a lease (PostgreSQL ``FOR UPDATE SKIP LOCKED``, SQLite
   ``BEGIN IMMEDIATE`` + compare-and-set), read the study's instances, check the input
   fingerprint, record the success (and the audit rows). Claims/s runs from the first claim to the
   last success, from the audit log (process start-up is not counted). The peer in the same run is
   one worker on the same database: the ratio says how the queue scales with N workers.
2. **Release to queued.** ``pacs-triage serve --workers 0`` with ``completion.quiet_seconds``
   = 1 and the default sweep interval (1 s); ``--studies`` studies are sent one after the other,
   each on its own association (pynetdicom, 3 small CT instances). For each study: the job's
   ``created_at`` minus the association's ``ended_at``. The quiet period is a deliberate wait;
   the rest is the sweep's polling interval plus the work of completing, routing and queueing.

The machine is shared and noisy: compare the ratios within a run, not absolutes across runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, select, text

from daemon.dicom.scu import send_files
from storage.db import make_engine, make_session_factory
from storage.models import Association, Instance, Job, Series
from tests.support.load import claim_stats, seed_jobs, start_workers, stop_workers, wait_done
from tests.support.process import wait_until
from tests.support.queue_db import ct_series
from tests.support.service import ServiceFactory

PG_ADMIN_URL = os.environ.get("PACS_TRIAGE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
QUIET_SECONDS = 1.0


@contextmanager
def database(backend: str, workdir: Path) -> Iterator[str]:
    """A fresh, empty database of ``backend``, removed afterwards."""
    if backend == "sqlite":
        yield f"sqlite:///{workdir / f'bench-{uuid.uuid4().hex[:8]}.db'}"
        return
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"bench_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def claims_per_second(backend: str, workers: int, jobs: int, workdir: Path) -> float:
    with database(backend, workdir) as url:
        seed_jobs(url, jobs)
        processes = start_workers(url, workdir / "home", workers)
        try:
            wait_done(url, jobs, processes, timeout=900)
        finally:
            for code, err in stop_workers(processes):
                if code != 0 or "database is locked" in err:
                    raise SystemExit(f"a worker failed ({code}): {err[-2000:]}")
        stats = claim_stats(url)
        if sorted(set(stats.claims_per_job.values())) != [1] or len(stats.claims_per_job) != jobs:
            raise SystemExit(f"jobs claimed more than once or lost: {stats.claims_per_job.most_common(3)}")
        return stats.claims_per_second


def release_to_queued(backend: str, studies: int, workdir: Path) -> list[float]:
    """Seconds from each study's association release to its job's creation."""
    with database(backend, workdir) as url:
        factory = ServiceFactory(workdir / f"serve-{backend}", url)
        try:
            svc = factory(
                env={
                    "PACS_TRIAGE_COMPLETION__QUIET_SECONDS": str(QUIET_SECONDS),
                    "PACS_TRIAGE_WORKERS__COUNT": "0",
                    "PACS_TRIAGE_LOGGING__LEVEL": "WARNING",
                }
            )
            for n in range(studies):
                study = f"2.25.{uuid.uuid4().int}"
                files = ct_series(workdir / "studies" / str(n), study, study + ".1", 3)
                if not all(r.ok for r in send_files(svc.peer, files, calling_ae="BENCH", timeout=30)):
                    raise SystemExit("a store failed")
            engine = make_engine(url, pool_size=1)
            sessions = make_session_factory(engine)

            def queued() -> int:
                with sessions() as session:
                    return len(session.scalars(select(Job.id)).all())

            wait_until(lambda: queued() == studies, timeout=120, what="every study's job")
            with sessions() as session:
                rows = session.execute(
                    select(Job.created_at, Association.ended_at)
                    .join(Series, Series.study_id == Job.study_id)
                    .join(Instance, Instance.series_id == Series.id)
                    .join(Association, Association.id == Instance.association_id)
                    .distinct()
                ).all()
            engine.dispose()
        finally:
            factory.cleanup()
    return [(created - ended).total_seconds() for created, ended in rows if ended is not None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=500, help="jobs per claim run (default 500)")
    parser.add_argument("--studies", type=int, default=10, help="studies for release-to-queued (default 10)")
    parser.add_argument("--no-postgresql", action="store_true", help="SQLite only")
    args = parser.parse_args(argv)
    backends = [("sqlite", 4)] + ([] if args.no_postgresql else [("postgresql", 8)])
    print(
        f"# Queue benchmark ({platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()})\n"
    )
    print(f"Claims: {args.jobs} jobs, `noop` pipeline, `pacs-triage worker` processes.\n")
    print("| database | workers | claims/s | 1 worker, claims/s | ratio |")
    print("|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="pt-queue-bench-") as tmp:
        workdir = Path(tmp)
        for backend, workers in backends:
            one = claims_per_second(backend, 1, args.jobs, workdir)
            many = claims_per_second(backend, workers, args.jobs, workdir)
            print(f"| {backend} | {workers} | {many:.0f} | {one:.0f} | {many / one:.2f} |", flush=True)
        print(
            f"\nRelease to queued: {args.studies} studies, one association each, quiet period "
            f"{QUIET_SECONDS:g} s, sweep every 1 s (default).\n"
        )
        print("| database | median s | p95 s | max s | median minus quiet period, s |")
        print("|---|---:|---:|---:|---:|")
        for backend, _ in backends:
            delays = sorted(release_to_queued(backend, args.studies, workdir))
            p95 = delays[min(len(delays) - 1, round(0.95 * (len(delays) - 1)))]
            median = statistics.median(delays)
            print(
                f"| {backend} | {median:.2f} | {p95:.2f} | {delays[-1]:.2f} | {median - QUIET_SECONDS:.2f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
