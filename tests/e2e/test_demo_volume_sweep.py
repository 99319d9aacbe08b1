"""The demo passes its own gate for many phantoms, not one seed (issue 13 item 8).

Each case runs what ``pacs-triage demo`` runs, in-process and without the network: the phantom
series written as DICOM files (``write_phantom_series``), ``pipeline.runner.run`` with the demo
pipeline's spec (``demo_spec``, as ``daemon.pipelines.monai.demo_pipeline_spec`` builds it with the
default ``[pipelines]`` settings), the SR read back (``read_sr``) and the demo's verdict
(``daemon.demo.run.judge`` at ``DemoOptions.tolerance``): every lesion within 15 % of its own truth,
nothing reported that is not in the truth, the right priority, every slice referenced.

Before the fix (sliding window 96 x 96 x 32, overlap 0.25) lesions cut by a window edge came out
too small: seed 3 -20.7 %, two lesions seed 5 -62.4 % / -27.2 %, seed 2 -56.2 %. After it, 10 cases
still missed (small lesions grown by a partial-volume rim, +16 to +21 %; seed 13 -41.5 %; false-positive
components at seed 7 and 18): the network was trained with an up-weighted lesion and soft Dice to the
last step, which biases partial-volume voxels towards the lesion. Retrained so the last 40 % of steps
minimise plain soft cross-entropy (optimum p = coverage; ``pipeline.demo.training``), all 40 pass.
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

CASES = [(seed, 1, 64) for seed in range(20)] + [(seed, n, 64) for n in (2, 3) for seed in range(10)]
# The demo's default seed at 300 slices missed too (-17.1 %, issue notes): the bias was general.
CASES.append((DemoOptions().seed, 1, 300))
PARAMS = [
    pytest.param(seed, n, slices, id=f"seed{seed}-lesions{n}-slices{slices}") for seed, n, slices in CASES
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
@pytest.mark.parametrize(("seed", "lesions", "slices"), PARAMS)
def test_demo_gate_holds(spec: PipelineSpec, tmp_path: Path, seed: int, lesions: int, slices: int) -> None:
    options = DemoOptions(seed=seed, lesions=lesions, slices=slices)
    truth = write_phantom_series(tmp_path, seed=seed, lesions=lesions, slices=options.slices)
    files = sorted(tmp_path.glob("*.dcm"))
    result = runner.run(files, spec, input_fingerprint=f"sweep-{seed}-{lesions}", analysis_started=STARTED)
    report = read_sr(result.sr)
    sent = frozenset(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files)
    verdict = judge(report, truth, sent, options.tolerance)
    print("\n".join(verdict.lines))
    assert verdict.ok, "\n".join(verdict.lines)
