"""500 jobs claimed concurrently by real worker processes: each runs once, none is lost, nothing locks up."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage.models import JobState
from tests.support.load import claim_stats, counts, seed_jobs, start_workers, stop_workers, wait_done

JOBS = 500


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "workers"), [("sqlite", 4), ("postgresql", 8)])
def test_jobs_claimed_concurrently_run_exactly_once(
    backend: str, workers: int, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}" if backend == "sqlite" else str(request.getfixturevalue("pg_url"))
    seed_jobs(url, JOBS)
    processes = start_workers(url, tmp_path / "home", workers)
    try:
        wait_done(url, JOBS, processes, timeout=600)
    finally:
        results = stop_workers(processes)
    for code, stderr in results:
        assert "database is locked" not in stderr
        assert code == 0, stderr[-3000:]
    assert counts(url) == {JobState.SUCCEEDED.value: JOBS}, "every job ran and none is lost"
    stats = claim_stats(url)
    assert len(stats.claims_per_job) == JOBS
    assert set(stats.claims_per_job.values()) == {1}, "no job was claimed twice"
    assert len(stats.owners) >= 2, f"the work was shared: {stats.owners}"
