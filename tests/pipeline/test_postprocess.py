"""Postprocessing shortcuts (pipeline.postprocess) against the bundles' own order, on real bundle configs.

- The exact argmax (always on) gives the labels ``AsDiscreted(argmax)`` gives: equality, on spleen,
  wholeBody at 3 mm and the demo bundle, run end to end through the runtime on phantom volumes.
- ``invert_labels`` (opt-in) changes labels only at boundaries: Dice against the bundle's order on
  spleen's and the demo's transforms; a no-op on wholeBody, which already inverts labels.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline
from pipeline.bundle_runtime import BundleRuntime, Prediction, bundle_sha256
from pipeline.demo.phantom import PhantomOptions, make_phantom_volume
from pipeline.postprocess import ExactArgmaxd, channel_argmax
from pipeline.volume import Volume
from tests.paths import BUNDLES

SPLEEN = BUNDLES / "spleen_ct_segmentation"
WHOLEBODY = BUNDLES / "wholeBody_ct_segmentation"
DEMO = Path(pipeline.__file__).parent / "demo" / "bundles"
LOWRES = {"displayable_configs#highres": False}
pytestmark = [  # the zoo configs predate MONAI 1.6; both warnings are known and harmless here
    pytest.mark.filterwarnings("ignore:Detected deprecated name 'optional_packages_version':UserWarning"),
    pytest.mark.filterwarnings("ignore:monai.transforms.spatial.dictionary Orientationd:FutureWarning"),
]


def _phantom(seed: int = 1000, lesions: int = 3, slices: int = 24, noise: bool = True) -> Volume:
    options = PhantomOptions(matrix=256) if noise else PhantomOptions(matrix=256, noise_sd_hu=(0.0, 0.0))
    volume, _, _ = make_phantom_volume(seed, lesions, slices, options=options)
    return volume


def _threshold_net() -> torch.nn.Module:
    """Two channels; channel 1 where the bundle-scaled intensity exceeds 0.5 (sharp but finite logits)."""
    net = torch.nn.Conv3d(1, 2, 1)
    with torch.no_grad():
        net.weight.zero_()
        net.bias.zero_()
        net.weight[1, 0] = 40.0
        net.bias[1] = -20.0
    return net.eval()


def _load(bundle: Path, root: Path, **options: object) -> BundleRuntime:
    return BundleRuntime.load(
        bundle,
        sha256=bundle_sha256(bundle),
        allowed_dirs=[root],
        device="cpu",
        **options,  # type: ignore[arg-type]
    )


def _bundle_order(runtime: BundleRuntime) -> BundleRuntime:
    """The same runtime with the bundle's postprocessing exactly as parsed (MONAI's AsDiscreted)."""
    original = runtime.parser.get_parsed_content("postprocessing")
    twin = copy.copy(runtime)
    twin.postprocessing_steps = [s for s in original.transforms if s is not None]
    return twin


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def _copy_with_weights(bundle: Path, root: Path, overrides: dict[str, object] | None = None, name: str = "model.pt") -> Path:  # fmt: skip
    from monai.bundle import ConfigParser

    target = root / bundle.name
    shutil.copytree(bundle, target)
    parser = ConfigParser()
    parser.read_config(str(target / "configs" / "inference.json"))
    parser.update(overrides or {})
    torch.manual_seed(0)
    (target / "models").mkdir(exist_ok=True)
    torch.save(parser.get_parsed_content("network_def").state_dict(), target / "models" / name)
    return target


# --- the exact argmax ------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [2, 3, 105])
def test_channel_argmax_equals_torch_argmax_including_ties(channels: int) -> None:
    generator = torch.Generator().manual_seed(channels)
    x = torch.randint(0, 4, (channels, 9, 8, 7), generator=generator).float()  # many ties
    assert torch.equal(channel_argmax(x), torch.argmax(x, dim=0, keepdim=True))
    x = torch.rand((channels, 9, 8, 7), generator=generator)
    assert torch.equal(channel_argmax(x), torch.argmax(x, dim=0, keepdim=True))


def test_channel_argmax_leaves_nan_to_torch() -> None:
    x = torch.rand(2, 4, 4, 4)
    x[0, 1, 1, 1] = float("nan")
    assert torch.equal(channel_argmax(x), torch.argmax(x, dim=0, keepdim=True))


def test_exact_argmaxd_keeps_meta_data_and_dtype() -> None:
    from monai.data import MetaTensor
    from monai.transforms import AsDiscreted

    source = MetaTensor(torch.rand(2, 5, 6, 7), affine=torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0])))
    ours = ExactArgmaxd(["pred"])({"pred": source})["pred"]
    theirs = AsDiscreted(keys="pred", argmax=True)({"pred": source})["pred"]
    assert isinstance(ours, MetaTensor) and ours.dtype == theirs.dtype == torch.float32
    assert torch.equal(ours.as_tensor(), theirs.as_tensor())
    assert torch.equal(ours.affine, theirs.affine)


def _same_labels(ours: Prediction, theirs: Prediction) -> None:
    assert ours.labels is not None and theirs.labels is not None
    np.testing.assert_array_equal(ours.labels, theirs.labels)
    if theirs.probabilities is None:
        assert ours.probabilities is None
    else:
        np.testing.assert_array_equal(ours.probabilities, theirs.probabilities)


def test_exact_argmax_gives_the_bundles_labels_on_spleen(tmp_path: Path) -> None:
    runtime = _load(_copy_with_weights(SPLEEN, tmp_path), tmp_path)
    runtime.network = _threshold_net()
    volume = _phantom()
    _same_labels(runtime.predict(volume), _bundle_order(runtime).predict(volume))


def test_exact_argmax_gives_the_bundles_labels_on_wholebody_3mm(tmp_path: Path) -> None:
    bundle = _copy_with_weights(WHOLEBODY, tmp_path, LOWRES, name="model_lowres.pt")
    runtime = _load(bundle, tmp_path, overrides=LOWRES)
    volume = _phantom(lesions=1)
    _same_labels(runtime.predict(volume), _bundle_order(runtime).predict(volume))


@pytest.mark.slow
def test_exact_argmax_gives_the_bundles_labels_on_the_demo_bundle() -> None:
    runtime = _load(DEMO / "lesion_seg", DEMO)
    volume = _phantom(seed=1001)
    _same_labels(runtime.predict(volume), _bundle_order(runtime).predict(volume))


# --- invert_labels ---------------------------------------------------------------------------------


def test_invert_labels_on_spleen_changes_only_boundaries(tmp_path: Path) -> None:
    bundle = _copy_with_weights(SPLEEN, tmp_path)
    reference = _bundle_order(_load(bundle, tmp_path))
    reference.network = _threshold_net()
    fast = _load(bundle, tmp_path, invert_labels=True)
    fast.network = _threshold_net()
    assert fast.inverts_labels and not reference.inverts_labels
    volume = _phantom(noise=False)  # organ-sized regions: noise would make every voxel a boundary

    expected, got = reference.predict(volume), fast.predict(volume)

    assert got.probabilities is None  # documented: no source-grid probabilities with invert_labels
    assert expected.labels is not None and got.labels is not None
    assert expected.labels.any() and not expected.labels.all()
    dice = _dice(expected.labels > 0, got.labels > 0)
    print(f"spleen transforms, invert_labels vs the bundle's order: Dice {dice:.4f}")
    assert dice >= 0.97


@pytest.mark.slow
def test_invert_labels_on_the_demo_bundle_keeps_the_lesions() -> None:
    reference = _bundle_order(_load(DEMO / "lesion_seg", DEMO))
    fast = _load(DEMO / "lesion_seg", DEMO, invert_labels=True)
    volume = _phantom(seed=1002)

    expected, got = reference.predict(volume), fast.predict(volume)

    assert expected.labels is not None and got.labels is not None and expected.labels.any()
    dice = _dice(expected.labels > 0, got.labels > 0)
    print(f"demo lesion_seg, invert_labels vs the bundle's order: Dice {dice:.4f}")
    assert dice >= 0.95


def test_invert_labels_is_a_no_op_where_the_bundle_inverts_labels_already(tmp_path: Path) -> None:
    bundle = _copy_with_weights(WHOLEBODY, tmp_path, LOWRES, name="model_lowres.pt")
    runtime = _load(bundle, tmp_path, overrides=LOWRES, invert_labels=True)
    assert not runtime.inverts_labels


# --- resampling in float32 (a bundle override, documented in README "Speed options") ---------------

SPACING_FLOAT64 = {"preprocessing#transforms#2#dtype": "$numpy.float64"}  # MONAI's default, before


@pytest.mark.slow
def test_demo_spacing_in_float32_gives_the_same_labels() -> None:
    """The demo bundles resample in float32 (MONAI's Spacingd defaults to float64: twice the memory)."""
    from monai.transforms import Spacingd

    reference = _load(DEMO / "lesion_seg", DEMO, overrides=SPACING_FLOAT64)
    lighter = _load(DEMO / "lesion_seg", DEMO)
    assert isinstance(lighter.preprocessing.transforms[2], Spacingd)
    assert lighter.preprocessing.transforms[2].dtype == (torch.float32,)
    assert reference.preprocessing.transforms[2].dtype == (np.float64,)
    volume = _phantom(seed=1003)

    expected, got = reference.predict(volume), lighter.predict(volume)

    assert expected.labels is not None and got.labels is not None and expected.labels.any()
    np.testing.assert_array_equal(got.labels, expected.labels)
