"""``pacs-triage demo``, the README's first command, as a newcomer runs it (a subprocess, exit status)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.e2e import DemoBundles
from tests.support.process import clean_env, run_cli

pytestmark = [pytest.mark.slow]


def test_the_demo_sends_a_phantom_and_gets_a_matching_sr_back(
    tmp_path: Path, demo_bundles: DemoBundles
) -> None:
    args = ["demo", "--slices", "48", "--home", str(tmp_path / "demo")]
    if not demo_bundles.committed:
        args += ["--bundle-dir", str(demo_bundles.directory)]
    # The demo ignores PACS_TRIAGE_* settings: a stray one must not leak into it.
    env = clean_env({"PACS_TRIAGE_DATABASE_URL": "postgresql://nobody@192.0.2.1/none"})
    done = run_cli(*args, env=env, timeout=600)
    out = done.stdout + done.stderr
    assert "SR arrived at the mock PACS" in out, out
    assert "where the time went" in out and "inference" in out, out
    # Every DICOM result kind reaches the mock PACS: the KOS and each key image it points at.
    assert "KOS arrived" in out, out
    arrived = re.search(r"key images arrived: (\d+) of (\d+)", out)
    assert arrived is not None and arrived[1] == arrived[2] != "0", out
    assert done.returncode == 0 and "RESULT: the SR arrived and matches the ground truth" in out, out
    assert (tmp_path / "demo" / "pacs-triage.db").exists()  # --home kept the demo's own database


def test_without_the_trained_bundles_the_demo_says_so_and_fails(tmp_path: Path) -> None:
    empty = tmp_path / "bundles"
    empty.mkdir()
    done = run_cli("demo", "--bundle-dir", str(empty), env=clean_env(), timeout=300)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "the trained demo bundles are not there yet" in done.stdout
    assert "python -m pipeline.demo.training" in done.stdout
