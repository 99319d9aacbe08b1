"""Cold start (issue 15): a worker loads its routed pipelines' models when it starts, not on the first job."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import load_config
from daemon.pipelines.registry import Pipelines
from pipeline import bundle_runtime


def test_warm_loads_the_demo_bundles_into_the_cache_the_runner_uses(tmp_path: Path) -> None:
    from pipeline import runner

    config = load_config(
        environ={"PACS_TRIAGE_HOME": str(tmp_path), "PACS_TRIAGE_PIPELINES__DEMO_DEVICE": "cpu"}
    )
    bundle_runtime.clear_bundle_cache()
    pipelines = Pipelines(config)

    pipelines.warm(["demo", "echo", "not-a-pipeline"])  # unknown names are the routing check's business

    demo = pipelines.get("demo")
    spec = demo.spec  # type: ignore[attr-defined]
    loaded = dict(bundle_runtime._cache)
    assert len(loaded) == 2, "the segmentation and the classification bundle"
    # What a job's run asks for is what was loaded: same objects, nothing loaded again.
    assert runner._runtime(spec.segmentation) in loaded.values()
    assert runner._runtime(spec.classification) in loaded.values()
    assert len(bundle_runtime._cache) == 2


def test_a_pipeline_that_cannot_load_is_logged_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    empty = tmp_path / "no-bundles"
    empty.mkdir()
    config = load_config(
        environ={"PACS_TRIAGE_HOME": str(tmp_path), "PACS_TRIAGE_PIPELINES__DEMO_BUNDLE_DIR": str(empty)}
    )
    with caplog.at_level("WARNING"):
        Pipelines(config).warm(["demo"])
    assert "pipeline demo could not be loaded at start" in caplog.text
