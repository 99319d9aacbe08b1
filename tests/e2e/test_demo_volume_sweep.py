"""The demo passes its own gate for many phantoms, not one seed (issue 13 item 8).

Each case runs what ``pacs-triage demo`` runs, in-process and without the network: the phantom
series written as DICOM files (``write_phantom_series``), ``pipeline.runner.run`` with the demo
pipeline's spec (``demo_spec``, as ``daemon.pipelines.monai.demo_pipeline_spec`` builds it with the
default ``[pipelines]`` settings), the SR read back (``read_sr``) and the demo's verdict
(``daemon.demo.run.judge`` at ``DemoOptions.tolerance``): every lesion within 15 % of its own truth,
nothing reported that is not in the truth, the right priority, every slice referenced.

Before the fix (sliding window 96 x 96 x 32, overlap 0.25) lesions cut by a window edge came out
too small: seed 3 -20.7 %, two lesions seed 5 -62.4 % / -27.2 %, seed 2 -56.2 %.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pydicom
import pytest

from daemon.config.pipelines import PipelinesConfig
from daemon.demo.run import DemoOptions, judge
from pipeline import runner
from pipeline.demo.bundle import DEMO_BUNDLE_DIR, demo_spec
from pipeline.demo.phantom import write_phantom_series
from pipeline.spec import PipelineSpec
from pipeline.writers.sr_reader import read_sr

CASES = [(seed, 1) for seed in range(20)] + [(seed, n) for n in (2, 3) for seed in range(10)]
# Still outside the gate after the window fix, measured 2026-12-03 (README, "Demo volumes across seeds").
# The network's probabilities themselves are wrong there (the probability sum errs like the voxel
# count): small lesions grown by a partial-volume rim (+16 to +21 %), seed 13 under-segmented (-41.5 %),
# false-positive components (seeds 7: 4.4 mL, also before the fix; 18: 0.67 mL). Retraining is the fix;
# strict: a case that passes after retraining fails here until its mark is removed.
MODEL_ERRORS = {
    (3, 1): "+18.9 %", (7, 1): "FP 4.4 mL", (13, 1): "-41.5 %", (18, 1): "FP 0.67 mL",
    (3, 2): "+19.6 %", (7, 2): "+15.9 %, FP 4.4 mL", (8, 2): "+21.2 %",
    (1, 3): "+17.0 %, +16.0 %", (3, 3): "-18.1 %", (7, 3): "-19.2 %, FP 4.4 mL",
}  # fmt: skip
PARAMS = [
    pytest.param(
        seed,
        n,
        id=f"seed{seed}-lesions{n}",
        marks=[pytest.mark.xfail(strict=True, reason=f"demo model error {MODEL_ERRORS[seed, n]}")]
        if (seed, n) in MODEL_ERRORS
        else [],
    )
    for seed, n in CASES
]
STARTED = datetime.datetime(2026, 1, 1, 12, 0, 0)


@pytest.fixture(scope="module")
def spec() -> PipelineSpec:
    defaults = PipelinesConfig()
    return demo_spec(bundle_dir=defaults.demo_bundle_dir or DEMO_BUNDLE_DIR, device=defaults.demo_device)


def test_the_sweep_runs_the_demos_defaults() -> None:
    options = DemoOptions()
    assert (options.slices, options.tolerance) == (64, 0.15)


@pytest.mark.slow
@pytest.mark.sweep
@pytest.mark.parametrize(("seed", "lesions"), PARAMS)
def test_demo_gate_holds(spec: PipelineSpec, tmp_path: Path, seed: int, lesions: int) -> None:
    options = DemoOptions(seed=seed, lesions=lesions)
    truth = write_phantom_series(tmp_path, seed=seed, lesions=lesions, slices=options.slices)
    files = sorted(tmp_path.glob("*.dcm"))
    result = runner.run(files, spec, input_fingerprint=f"sweep-{seed}-{lesions}", analysis_started=STARTED)
    report = read_sr(result.sr)
    sent = frozenset(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files)
    verdict = judge(report, truth, sent, options.tolerance)
    print("\n".join(verdict.lines))
    assert verdict.ok, "\n".join(verdict.lines)
