"""Model Zoo bundles run unchanged (random weights) through the runner to dciodvfy-clean results.

CT: wholeBody (3 mm) and swin_unetr_btcv on small phantoms; MR: prostate_mri_anatomy on a crop of
the real sagittal MR of testdata. They need the `zoo` extra (einops, pandas, scikit-image).

The configs in ``shared/bundles`` are copied unchanged; the tests add only ``models/``, a random
initialisation of the bundle's own ``network_def``. wholeBody runs at 3 mm (``highres=false``, as
its README asks of machines with less than 26 GB); the phantoms are small so that each test stays
well under two minutes on two cores. Random weights segment noise: the pipelines report two labels
and components of at least 1 mL, so the SR and SEG stay small.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.bundle_config import build_parser
from pipeline.bundle_pins import read_bundle_files
from pipeline.bundle_runtime import bundle_sha256, clear_bundle_cache
from pipeline.demo.phantom import PhantomOptions, write_phantom_series
from pipeline.measure import PriorityThresholds
from pipeline.orientation import Orientation
from pipeline.runner import PipelineResult, run
from pipeline.series_select import SelectionRule
from pipeline.spec import BundleSpec, PipelineSpec
from tests.paths import BUNDLES as ZOO
from tests.pipeline.test_runner import WHEN
from tests.support.dicom_validators import assert_dciodvfy_clean, read_headers, roundtrip
from tests.support.tid1500_checks import check_pacs_triage_sr

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


def _random_weights(bundle: Path, overrides: dict[str, Any], name: str) -> None:
    """A random initialisation of network_def as the runtime builds it (its compatibility fixes included)."""
    parser = build_parser(read_bundle_files(bundle), overrides, torch.device("cpu"))
    torch.manual_seed(0)
    (bundle / "models").mkdir(exist_ok=True)
    torch.save(parser.get_parsed_content("network_def").state_dict(), bundle / "models" / name)


def _zoo_run(
    tmp_path: Path,
    name: str,
    overrides: dict[str, Any],
    weights: str,
    reported: frozenset[str],
    options: PhantomOptions | None,
    files: list[Path] | None = None,
    modality: str = "CT",
) -> tuple[list[Path], PipelineResult]:
    clear_bundle_cache()
    bundle = Path(shutil.copytree(ZOO / name, tmp_path / "bundles" / name))
    _random_weights(bundle, overrides, name=weights)
    spec = PipelineSpec(
        name=f"zoo-{name}",
        version="1",
        selection=SelectionRule(
            modalities=frozenset({modality}), orientations=frozenset(Orientation), min_slices=16
        ),
        segmentation=BundleSpec(
            path=bundle,
            sha256=bundle_sha256(bundle),
            allowed_dirs=(tmp_path / "bundles",),
            overrides=overrides,
            device="cpu",
        ),
        thresholds=PriorityThresholds(urgent_volume_ml=1.0),
        reported=reported,
        min_lesion_ml=1.0,
    )
    if files is None:
        write_phantom_series(tmp_path / "study", seed=5, lesions=1, slices=24, options=options)
        files = sorted((tmp_path / "study").glob("*.dcm"))
    return files, run(files, spec, input_fingerprint=f"zoo-{name}", analysis_started=WHEN)


def _validate(files: list[Path], result: PipelineResult, label: str) -> None:
    assert result.series_instance_uid == str(read_headers(files[:1])[0].SeriesInstanceUID)
    assert_dciodvfy_clean(result.sr, f"{label} SR")
    assert result.findings.findings, "random weights segmented nothing: the SEG path would go untested"
    assert result.seg is not None
    assert_dciodvfy_clean(result.seg, f"{label} SEG")
    assert len(result.seg.SegmentSequence) == len(result.findings.findings)
    check_pacs_triage_sr(
        roundtrip(result.sr), sources=read_headers(files), findings=result.findings, seg=result.seg
    )


@pytest.mark.peer
def test_wholebody_at_3mm_runs_unchanged(tmp_path: Path) -> None:
    lowres = {"displayable_configs#highres": False}
    files, result = _zoo_run(
        tmp_path,
        "wholeBody_ct_segmentation",
        lowres,
        "model_lowres.pt",  # what $modelname picks when not highres
        frozenset({"liver", "spleen"}),
        PhantomOptions(matrix=96, pixel_spacing_mm=3.0, slice_thickness_mm=5.0),
    )
    assert {f.name for f in result.findings.findings} <= {"liver", "spleen"}
    assert (result.findings.algorithm.name, result.findings.algorithm.version) == (
        "Whole body CT segmentation",
        "0.2.5",
    )
    _validate(files, result, "wholeBody")


@pytest.mark.peer
def test_swin_unetr_btcv_runs_unchanged(tmp_path: Path) -> None:
    # needs einops (the `zoo` extra, part of `dev`)
    files, result = _zoo_run(
        tmp_path,
        "swin_unetr_btcv_segmentation",
        {},
        "model.pt",
        frozenset({"spleen", "Liver"}),
        PhantomOptions(matrix=64, pixel_spacing_mm=2.0, slice_thickness_mm=2.5),
    )
    assert {f.name for f in result.findings.findings} <= {"spleen", "Liver"}
    _validate(files, result, "swin_unetr_btcv")


# --- MR: prostate_mri_anatomy on a crop of the real MR series ------------------------------------


def _cropped_mr(out: Path, size: int = 64) -> list[Path]:
    """The real sagittal MR of testdata, each slice cropped to its central ``size`` x ``size`` pixels.

    A derived series (new UIDs, ImagePositionPatient moved to the crop's first pixel): the prostate
    bundle resamples to 0.5 mm, which the full 256 x 256 field of view makes too slow for a test.
    """
    import numpy as np
    import pydicom
    from pydicom.uid import generate_uid

    out.mkdir(parents=True)
    series_uid = generate_uid()
    paths = []
    for n, path in enumerate(
        sorted((ZOO.parent / "testdata" / "mr_series" / "sag_t1_fl2d_HFS").glob("*.dcm"))
    ):
        ds = pydicom.dcmread(path)
        r0, c0 = (int(ds.Rows) - size) // 2, (int(ds.Columns) - size) // 2
        pixels = ds.pixel_array[r0 : r0 + size, c0 : c0 + size]
        row_dir, col_dir = (
            np.array(ds.ImageOrientationPatient[:3], float),
            np.array(ds.ImageOrientationPatient[3:], float),
        )
        spacing_row, spacing_col = (float(v) for v in ds.PixelSpacing)
        origin = (
            np.array(ds.ImagePositionPatient, float) + c0 * spacing_col * row_dir + r0 * spacing_row * col_dir
        )
        ds.ImagePositionPatient = [f"{v:.6f}" for v in origin]
        ds.Rows, ds.Columns = size, size
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImageType = ["DERIVED", "SECONDARY"]
        target = out / f"{n:03d}.dcm"
        ds.save_as(target, enforce_file_format=True)
        paths.append(target)
    return paths


@pytest.mark.peer
def test_prostate_mri_anatomy_runs_unchanged_on_real_mr(tmp_path: Path) -> None:
    # its imports name pandas (the `zoo` extra); KeepLargestConnectedComponentd runs on scipy
    files, result = _zoo_run(
        tmp_path,
        "prostate_mri_anatomy",
        {},
        "model.pt",
        frozenset(),
        None,
        files=_cropped_mr(tmp_path / "mr"),
        modality="MR",
    )
    assert {f.name for f in result.findings.findings} <= {"central gland", "peripheral zone"}
    _validate(files, result, "prostate_mri_anatomy")


@pytest.mark.peer
def test_spleen_runs_unchanged(tmp_path: Path) -> None:
    files, result = _zoo_run(
        tmp_path,
        "spleen_ct_segmentation",
        {},
        "model.pt",
        frozenset(),
        PhantomOptions(matrix=96, pixel_spacing_mm=3.0, slice_thickness_mm=5.0),
    )
    assert {f.name for f in result.findings.findings} <= {"spleen"}
    _validate(files, result, "spleen_ct_segmentation")
