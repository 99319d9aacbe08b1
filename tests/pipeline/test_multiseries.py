"""Multi-series inputs: brats_mri_segmentation on four MR series of one study, stacked as channels.

The four series are derived at test time from the real sagittal MR (``tests/pipeline/brats_study.py``:
non-linear intensity transforms per channel, T2 on a coarser grid, SeriesNumbers against the channel
order). The bundle is the real brats config, unchanged, with a random initialisation of its own
``network_def`` in ``models/``. What is checked:

* the selection picks each channel's series by Series Description and contrast agent, and the stack
  the runtime feeds the bundle (after the bundle's own preprocessing) has them in the declared order;
* the whole pipeline gives a dciodvfy-clean SR and a SEG with overlapping segments;
* a study without FLAIR is refused naming FLAIR; series of different frames of reference are refused
  unless registration is declared;
* ``[[pipelines.monai.channels]]`` becomes the spec's channels.
"""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import torch

from daemon.config import ConfigError, load_config
from daemon.pipelines.monai import spec_from_config
from pipeline.bundle_config import build_parser
from pipeline.bundle_pins import read_bundle_files
from pipeline.bundle_runtime import bundle_sha256, clear_bundle_cache, load_bundle
from pipeline.errors import BundleError, NoUsableSeries
from pipeline.geometry import load_volume
from pipeline.measure import PriorityThresholds
from pipeline.multiseries import (
    Channel,
    MultiChannelVolume,
    MultiSeriesInput,
    UnregisteredSeries,
    select_channels,
    stack_channels,
)
from pipeline.orientation import Orientation
from pipeline.runner import run
from pipeline.series_select import SelectionRule, select_series
from pipeline.spec import BundleSpec, PipelineSpec
from tests.paths import BUNDLES
from tests.pipeline.brats_study import CHANNELS, RULES, peak_value, transforms, write_brats_study
from tests.support.dicom_validators import assert_dciodvfy_clean, read_headers, roundtrip
from tests.support.tid1500_checks import check_pacs_triage_sr, evidence_uids

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

WHEN = datetime.datetime(2026, 12, 3, 9, 30, 0)
BRATS = BUNDLES / "brats_mri_segmentation"


def channel_rule(name: str) -> SelectionRule:
    rule = RULES[name]
    return SelectionRule(
        modalities=frozenset({"MR"}),
        orientations=frozenset(Orientation),
        min_slices=16,
        series_description=str(rule["series_description"]),
        contrast=rule.get("contrast"),  # type: ignore[arg-type]
    )


def brats_inputs(*, assume_registered: bool = False) -> MultiSeriesInput:
    return MultiSeriesInput(
        channels=tuple(Channel(name=n, rule=channel_rule(n)) for n in CHANNELS),
        assume_registered=assume_registered,
    )


def brats_bundle(root: Path) -> Path:
    """The real brats config, unchanged, plus a random initialisation of its network_def."""
    bundle = Path(shutil.copytree(BRATS, root / "brats_mri_segmentation"))
    parser = build_parser(read_bundle_files(bundle), {}, torch.device("cpu"))
    torch.manual_seed(0)
    (bundle / "models").mkdir()
    torch.save(parser.get_parsed_content("network_def").state_dict(), bundle / "models" / "model.pt")
    return bundle


def brats_spec(bundle: Path, inputs: MultiSeriesInput | None = None) -> PipelineSpec:
    inputs = inputs or brats_inputs()
    return PipelineSpec(
        name="mr-brats",
        version="1",
        selection=inputs.reference.rule,
        multiseries=inputs,
        segmentation=BundleSpec(
            path=bundle, sha256=bundle_sha256(bundle), allowed_dirs=(bundle.parent,), device="cpu"
        ),
        thresholds=PriorityThresholds(urgent_volume_ml=1.0),
        min_lesion_ml=1.0,
    )


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    clear_bundle_cache()
    return brats_bundle(tmp_path_factory.mktemp("bundles"))


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    return write_brats_study(tmp_path_factory.mktemp("brats-study"))


def _files(study: dict[str, list[Path]], *names: str) -> list[Path]:
    return [p for n in (names or CHANNELS) for p in study[n]]


def _zscore_nonzero(x: np.ndarray) -> np.ndarray:
    """brats' NormalizeIntensityd(nonzero=True) on one channel, computed independently."""
    out = x.astype(np.float64).copy()
    inside = out != 0
    out[inside] = (out[inside] - out[inside].mean()) / out[inside].std()
    return out


# --- selection and stacking ----------------------------------------------------------------------


def test_each_channel_is_picked_by_its_description_and_contrast_agent(study: dict[str, list[Path]]) -> None:
    everything = _files(study)
    for name in CHANNELS:
        chosen = select_series(everything, channel_rule(name))
        assert set(chosen.paths) == set(study[name]), f"{name}: picked {chosen.reason}"
    # The T1 rules differ only in the contrast agent: each rejects the other series with that reason.
    t1 = select_series(everything, channel_rule("T1"))
    post_gad = read_headers(study["T1c"][:1])[0].SeriesInstanceUID
    assert "ContrastBolusAgent ['GADOLINIUM']" in dict(t1.rejected)[post_gad]
    by_sequence = SelectionRule(
        modalities=frozenset({"MR"}), orientations=frozenset(Orientation), sequence_name="^nope$"
    )
    with pytest.raises(NoUsableSeries, match=r"SequenceName '\*fl2d1' does not match '\^nope\$'"):
        select_series(everything, by_sequence)


def test_the_runtime_stacks_the_channels_in_the_declared_order(
    study: dict[str, list[Path]], bundle: Path
) -> None:
    # Written (and listed) in reverse: the order must come from the declaration, not the files or series.
    files = _files(study, *reversed(CHANNELS))
    inputs = brats_inputs()
    volume = stack_channels(select_channels(files, inputs), inputs)
    assert isinstance(volume, MultiChannelVolume)
    series = {n: str(read_headers(study[n][:1])[0].SeriesInstanceUID) for n in CHANNELS}
    assert volume.channel_names == CHANNELS
    assert volume.channel_series == tuple(series[n] for n in CHANNELS)
    assert volume.series_instance_uid == series["T1c"]  # the reference: the first declared channel

    original = load_volume(study["T1c"]).array.astype(np.float64)
    expected = {n: np.clip(f(original), 0, 4095) for n, f in transforms(peak_value()).items()}
    for index, name in enumerate(CHANNELS):
        if name != "T2":  # same grid as the reference: the series' own pixels
            np.testing.assert_array_equal(volume.channels[index], expected[name], err_msg=name)
    # T2 was written on every second row and column: on those voxels the resampling is exact.
    t2 = volume.channels[CHANNELS.index("T2")]
    np.testing.assert_allclose(t2[::2, ::2, :], expected["T2"][::2, ::2, :], atol=1e-3)
    assert any("'T2'" in w and "resampled" in w for w in volume.warnings), volume.warnings

    # What the bundle's own preprocessing (LoadImaged replaced, NormalizeIntensityd channel-wise) makes of it.
    runtime = load_bundle(bundle, sha256=bundle_sha256(bundle), allowed_dirs=(bundle.parent,), device="cpu")
    image = runtime._image(volume)
    assert tuple(image.shape) == (4, *volume.array.shape)
    fed = runtime.preprocessing({runtime.image_key: image})[runtime.image_key].numpy()
    assert fed.shape == (4, *volume.array.shape)
    for index, name in enumerate(CHANNELS):
        if name != "T2":
            np.testing.assert_allclose(fed[index], _zscore_nonzero(expected[name]), atol=1e-4, err_msg=name)
    # Each fed channel is most like its own transform of the original (T2 included), none other.
    for index, name in enumerate(CHANNELS):
        corr = {
            n: np.corrcoef(fed[index][::2, ::2].ravel(), expected[n][::2, ::2].ravel())[0, 1]
            for n in CHANNELS
        }
        assert max(corr, key=lambda n: corr[n]) == name and corr[name] > 0.999, (name, corr)


def test_channels_declared_out_of_the_bundles_order_are_refused_before_inference(
    study: dict[str, list[Path]], bundle: Path
) -> None:
    runtime = load_bundle(bundle, sha256=bundle_sha256(bundle), allowed_dirs=(bundle.parent,), device="cpu")
    swapped = MultiSeriesInput(
        channels=tuple(Channel(name=n, rule=channel_rule(n)) for n in ("T1", "T1c", "T2", "FLAIR"))
    )
    volume = stack_channels(select_channels(_files(study), swapped), swapped)
    with pytest.raises(BundleError, match=r"takes the channels T1c, T1, T2, FLAIR in this order"):
        runtime.predict(volume, pipeline="swapped")
    three = MultiSeriesInput(
        channels=tuple(Channel(name=n, rule=channel_rule(n)) for n in ("T1c", "T1", "T2"))
    )
    volume = stack_channels(select_channels(_files(study), three), three)
    with pytest.raises(BundleError, match=r"takes 4 input channels, the pipeline stacks 3 \(T1c, T1, T2\)"):
        runtime.predict(volume, pipeline="three")


def test_a_missing_flair_is_refused_naming_it(study: dict[str, list[Path]], bundle: Path) -> None:
    with pytest.raises(NoUsableSeries) as refused:
        run(
            _files(study, "T1c", "T1", "T2"),
            brats_spec(bundle),
            input_fingerprint="no-flair",
            analysis_started=WHEN,
        )
    message = str(refused.value)
    assert "missing input series FLAIR " in message, message
    assert "channel 3 'FLAIR' is missing" in message
    # every remaining series is named with why it is not FLAIR
    assert message.count("does not match '(?i)flair'") == 3, message
    assert "'T1c' is missing" not in message and "'T2' is missing" not in message


def test_different_frames_of_reference_are_refused_unless_registration_is_declared(
    tmp_path: Path, bundle: Path
) -> None:
    study = write_brats_study(tmp_path / "study", other_frame_of_reference=("T2",))
    files = _files(study)
    with pytest.raises(UnregisteredSeries) as refused:
        run(files, brats_spec(bundle), input_fingerprint="two-frames", analysis_started=WHEN)
    message = str(refused.value)
    assert "different frames of reference and no registration is declared" in message, message
    frames = {n: str(read_headers(study[n][:1])[0].FrameOfReferenceUID) for n in ("T1c", "T2")}
    assert frames["T1c"] != frames["T2"] and all(uid in message for uid in frames.values()), message
    assert "assume_registered" in message

    registered = brats_inputs(assume_registered=True)
    volume = stack_channels(select_channels(files, registered), registered)
    assert volume.channels.shape == (4, *volume.array.shape)
    assert any("frames of reference differ" in w for w in volume.warnings), volume.warnings


# --- the whole pipeline --------------------------------------------------------------------------


@pytest.mark.peer
def test_brats_runs_unchanged_on_four_derived_mr_series(study: dict[str, list[Path]], bundle: Path) -> None:
    files = _files(study)
    result = run(files, brats_spec(bundle), input_fingerprint="brats-four-series", analysis_started=WHEN)
    reference = study["T1c"]
    assert result.series_instance_uid == str(read_headers(reference[:1])[0].SeriesInstanceUID)
    for index, name in enumerate(CHANNELS):
        assert f"channel {index} {name!r}: series " in result.selection_reason
    assert (result.findings.algorithm.name, result.findings.algorithm.version) == (
        "BraTS MRI segmentation",
        "0.5.2",
    )
    assert result.findings.findings, "random weights segmented nothing: the SEG path would go untested"
    assert {f.name for f in result.findings.findings} <= {"Tumor core", "Whole tumor", "Enhancing tumor"}
    assert_dciodvfy_clean(result.sr, "brats SR")
    assert result.seg is not None
    assert_dciodvfy_clean(result.seg, "brats SEG")
    seg = hd.seg.Segmentation.from_dataset(roundtrip(result.seg))
    assert str(seg.SegmentationType) == "BINARY"
    assert len(seg.SegmentSequence) == len(result.findings.findings)
    # The SEG is on the reference series' grid: it references T1c's instances only.
    referenced = {
        str(i.ReferencedSOPInstanceUID)
        for s in seg.ReferencedSeriesSequence
        for i in s.ReferencedInstanceSequence
    }
    assert referenced == {str(h.SOPInstanceUID) for h in read_headers(reference)}
    sr = roundtrip(result.sr)
    check_pacs_triage_sr(sr, sources=read_headers(files), findings=result.findings, seg=result.seg)
    # The SR's evidence is every image the findings were derived from: all four series, and the SEG.
    assert evidence_uids(sr) == {str(h.SOPInstanceUID) for h in read_headers(files)} | {
        str(result.seg.SOPInstanceUID)
    }


# --- configuration -------------------------------------------------------------------------------


def _toml(tmp_path: Path, bundle: Path, body: str) -> Path:
    path = tmp_path / "pacs-triage.toml"
    path.write_text(
        f"""
home = {json.dumps(str(tmp_path / "home"))}
[[pipelines.monai]]
name = "mr-brats"
modalities = ["MR"]
orientations = ["sagittal", "axial"]
allowed_dirs = [{json.dumps(str(bundle.parent))}]
segmentation = {{ path = {json.dumps(str(bundle))}, sha256 = "{bundle_sha256(bundle)}" }}
{body}
""",
        encoding="utf-8",
    )
    return path


def test_channels_in_the_config_become_the_spec_channels(tmp_path: Path, bundle: Path) -> None:
    channels = "".join(
        f"[[pipelines.monai.channels]]\nname = {json.dumps(n)}\n"
        + "".join(f"{k} = {json.dumps(v)}\n" for k, v in RULES[n].items())
        for n in CHANNELS
    )
    config = load_config(_toml(tmp_path, bundle, "assume_registered = true\n" + channels), environ={})
    spec = spec_from_config(config.pipelines.monai[0])
    assert spec.multiseries is not None and spec.multiseries.assume_registered
    assert tuple(c.name for c in spec.multiseries.channels) == CHANNELS
    assert spec.selection == spec.multiseries.reference.rule
    flair = spec.multiseries.channels[3].rule
    assert (flair.series_description, flair.contrast, flair.modalities) == (
        "(?i)flair",
        None,
        frozenset({"MR"}),
    )
    assert spec.multiseries.channels[0].rule.contrast is True
    single = spec_from_config(load_config(_toml(tmp_path, bundle, ""), environ={}).pipelines.monai[0])
    assert single.multiseries is None and single.identity() != spec.identity()

    with pytest.raises(ConfigError, match="channel names must be unique"):
        load_config(_toml(tmp_path, bundle, '[[pipelines.monai.channels]]\nname = "T1"\n' * 2), environ={})
    with pytest.raises(ConfigError, match="assume_registered needs"):
        load_config(_toml(tmp_path, bundle, "assume_registered = true\n"), environ={})
    with pytest.raises(ConfigError, match="is not a valid regular expression"):
        load_config(
            _toml(tmp_path, bundle, '[[pipelines.monai.channels]]\nname = "T1"\nseries_description = "("\n'),
            environ={},
        )


def test_a_spec_refuses_a_selection_other_than_the_reference_channel(bundle: Path) -> None:
    inputs = brats_inputs()
    with pytest.raises(ValueError, match="rule of the reference channel 'T1c'"):
        PipelineSpec(
            name="mr-brats",
            version="1",
            selection=channel_rule("FLAIR"),
            multiseries=inputs,
            segmentation=brats_spec(bundle).segmentation,
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_brats_stack_on_cuda_with_amp_agrees_with_cpu(study: dict[str, list[Path]], bundle: Path) -> None:
    inputs = brats_inputs()
    volume = stack_channels(select_channels(_files(study), inputs), inputs)
    sha = bundle_sha256(bundle)
    cpu = load_bundle(bundle, sha256=sha, allowed_dirs=(bundle.parent,), device="cpu")
    cuda = load_bundle(bundle, sha256=sha, allowed_dirs=(bundle.parent,), device="cuda")
    assert cuda.device.type == "cuda" and cuda.amp
    on_cpu, on_cuda = cpu.predict(volume), cuda.predict(volume)
    assert on_cpu.masks is not None and on_cuda.masks is not None
    assert on_cuda.masks.shape == (3, *volume.array.shape)
    # float16 moves sigmoids near 0.5 across the threshold for a few voxels, not the masks
    for channel, name in enumerate(on_cpu.label_names):
        a, b = on_cpu.masks[channel], on_cuda.masks[channel]
        dice = 2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())
        assert dice > 0.95, f"{name}: Dice {dice:.3f} between CUDA+AMP and CPU"
