"""The bundle runtime on real Model Zoo configs (random weights) and small bundles made here.

The spleen configs in ``shared/bundles`` are used unchanged; the tests add only ``models/model.pt``,
a random initialisation of the bundle's own ``network_def``.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.bundle_runtime import (
    BundleKind,
    BundleRuntime,
    bundle_sha256,
    clear_bundle_cache,
    load_bundle,
)
from pipeline.errors import BundleError
from pipeline.volume import InstanceRef, Volume
from tests.paths import BUNDLES, TESTDATA

SPLEEN = BUNDLES / "spleen_ct_segmentation"
WHOLEBODY = BUNDLES / "wholeBody_ct_segmentation"
ABDOMEN = TESTDATA / "ct_series" / "abdomen_20"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytestmark = [  # the zoo configs predate MONAI 1.6; both warnings are known and harmless here
    pytest.mark.filterwarnings("ignore:Detected deprecated name 'optional_packages_version':UserWarning"),
    pytest.mark.filterwarnings("ignore:monai.transforms.spatial.dictionary Orientationd:FutureWarning"),
]


def _volume(array: np.ndarray, affine: np.ndarray) -> Volume:
    refs = tuple(InstanceRef("1.2.840.10008.5.1.4.1.1.2", f"2.25.{k + 1}") for k in range(array.shape[2]))
    return Volume(array.astype(np.float32), affine, "2.25.10", "2.25.11", "2.25.12", "CT", refs)


def _random_weights(bundle: Path, overrides: dict[str, Any] | None = None, name: str = "model.pt") -> None:
    """Save a random initialisation of the bundle's own network_def as its weights."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.update(overrides or {})
    torch.manual_seed(0)
    (bundle / "models").mkdir(exist_ok=True)
    torch.save(parser.get_parsed_content("network_def").state_dict(), bundle / "models" / name)


def _write_bundle(
    root: Path, inference: dict[str, Any], channels: dict[str, str], net: torch.nn.Module
) -> Path:
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    meta = {
        "name": root.name,
        "version": "0.0.1",
        "network_data_format": {"outputs": {"pred": {"type": "image", "channel_def": channels}}},
    }
    (root / "configs" / "metadata.json").write_text(json.dumps(meta))
    (root / "configs" / "inference.json").write_text(json.dumps(inference))
    torch.save(net.state_dict(), root / "models" / "model.pt")
    return root


def _rotation(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    a = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) * c + s * k + (1 - c) * np.outer(a, a)


def _oblique_sagittal(spacing: tuple[float, float, float]) -> np.ndarray:
    """Sagittal slices (i towards Posterior, j towards Inferior, k towards Right), tilted by 20 degrees."""
    sagittal = np.column_stack([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [-1.0, 0.0, 0.0]])
    affine = np.eye(4)
    affine[:3, :3] = _rotation((1.0, 0.3, 0.2), 20.0) @ sagittal @ np.diag(spacing)
    affine[:3, 3] = (40.0, -80.0, 120.0)
    return affine


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The allowed bundle directory, with the spleen bundle copied unchanged plus random weights."""
    root = tmp_path_factory.mktemp("bundles")
    shutil.copytree(SPLEEN, root / "spleen")
    _random_weights(root / "spleen")
    return root


@pytest.fixture(scope="module")
def spleen(bundles: Path) -> BundleRuntime:
    clear_bundle_cache()
    bundle = bundles / "spleen"
    return load_bundle(bundle, sha256=bundle_sha256(bundle), allowed_dirs=[bundles], device="cpu")


# --- the acceptance test --------------------------------------------------------------------------


def test_spleen_bundle_runs_unchanged_on_a_real_ct_series(spleen: BundleRuntime) -> None:
    from pipeline.geometry import load_volume

    volume = load_volume(sorted(ABDOMEN.glob("*.dcm")))
    assert volume.array.shape == (512, 512, 20)

    prediction = spleen.predict(volume, pipeline="spleen")

    assert prediction.kind is BundleKind.SEGMENTATION
    assert prediction.label_names == ("background", "spleen")
    assert prediction.labels is not None and prediction.labels.shape == volume.array.shape
    assert set(np.unique(prediction.labels)) <= {0, 1}
    # spleen inverts the softmax before the argmax: probabilities on the source grid, summing to 1
    assert prediction.probabilities is not None
    assert prediction.probabilities.shape == (2, *volume.array.shape)
    np.testing.assert_allclose(prediction.probabilities.sum(axis=0), 1.0, atol=1e-4)
    assert (prediction.labels == prediction.probabilities.argmax(axis=0)).mean() > 0.999
    assert prediction.algorithm.name == "Spleen CT segmentation" and prediction.algorithm.version == "0.5.9"
    assert prediction.algorithm.sha256 == spleen.sha256 and prediction.algorithm.pipeline == "spleen"
    assert not prediction.labels.flags.writeable


def test_spleen_inverts_to_the_source_grid_of_an_oblique_sagittal_volume(spleen: BundleRuntime) -> None:
    affine = _oblique_sagittal((0.9, 1.1, 3.0))
    rng = np.random.default_rng(1)
    volume = _volume(rng.normal(40.0, 60.0, (70, 54, 23)), affine)
    prediction = spleen.predict(volume)
    assert prediction.labels is not None and prediction.labels.shape == (70, 54, 23)
    assert prediction.probabilities is not None and prediction.probabilities.shape == (2, 70, 54, 23)


# --- geometry with a bundle whose "network" is a shifted threshold --------------------------------
# out[x, y, z] = (in[x + 2, y, z + 2] > 500 HU) on the bundle's RAS grid at 1.5 mm: the labels come
# back displaced by 3 mm towards patient Left (+x in LPS) and 3 mm towards Inferior (-z). An input
# read in the wrong space (e.g. an LPS affine taken as RAS) displaces them to the Right instead; a
# pointwise network could not tell, because Invertd undoes whatever the preprocessing did.

THRESHOLD_INFERENCE: dict[str, Any] = {
    "image_key": "image",
    "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
    "network_def": {
        "_target_": "torch.nn.Conv3d",
        "in_channels": 1,
        "out_channels": 2,
        "kernel_size": [5, 1, 5],
        "padding": [2, 0, 2],
    },
    "network": "$@network_def.to(@device)",
    "preprocessing": {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "LoadImaged", "keys": "@image_key"},
            {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
            {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "@image_key", "pixdim": [1.5, 1.5, 1.5], "mode": "bilinear"},
            {
                "_target_": "ScaleIntensityRanged",
                "keys": "@image_key",
                "a_min": 0,
                "a_max": 1000,
                "b_min": 0,
                "b_max": 1,
            },
        ],
    },
    "dataset": {"_target_": "Dataset", "data": "$[][0]"},  # would raise if it were ever resolved
    "inferer": {"_target_": "SimpleInferer"},
    "postprocessing": {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "@image_key"},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "/nonexistent"},
        ],
    },
    "initialize": ["$exit(1)"],
    "run": ["$exit(1)"],
}


def _threshold_net(out_channels: int = 2) -> torch.nn.Module:
    net = torch.nn.Conv3d(1, out_channels, (5, 1, 5), padding=(2, 0, 2))
    with torch.no_grad():
        net.weight.zero_()
        net.bias.zero_()
        net.weight[1, 0, 4, 0, 4] = 40.0  # channel 1 wins where the scaled intensity exceeds 0.5
        net.bias[1] = -20.0
    return net


@pytest.fixture(scope="module")
def threshold_bundle(bundles: Path) -> Path:
    return _write_bundle(
        bundles / "threshold", THRESHOLD_INFERENCE, {"0": "background", "1": "lesion"}, _threshold_net()
    )


def test_labels_land_where_the_source_voxels_are(bundles: Path, threshold_bundle: Path) -> None:
    affine = _oblique_sagittal((0.8, 1.0, 2.0))
    shape = (60, 50, 26)
    ijk = np.indices(shape).reshape(3, -1).T.astype(float)
    centre = np.array([27.0, 21.0, 12.0])
    truth = (np.linalg.norm((ijk - centre) @ affine[:3, :3].T, axis=1) <= 12.0).reshape(shape)
    volume = _volume(np.where(truth, 1000.0, 0.0), affine)

    runtime = load_bundle(
        threshold_bundle, sha256=bundle_sha256(threshold_bundle), allowed_dirs=[bundles], device="cpu"
    )
    prediction = runtime.predict(volume)

    assert prediction.labels is not None and prediction.labels.shape == shape
    found = prediction.labels == 1
    assert found.sum() == pytest.approx(truth.sum(), rel=0.1)
    centroid = affine[:3, :3] @ np.argwhere(found).mean(axis=0) + affine[:3, 3]
    # Orientationd keeps the tilt: the bundle's x and z axes are the source axes nearest to patient
    # Right and Superior (LPS: -x and +z), pointing that way; the labels move 3 mm against each.
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    towards_right = np.array([-1.0, 0.0, 0.0]) @ directions
    towards_superior = np.array([0.0, 0.0, 1.0]) @ directions
    axis_r, axis_s = int(np.argmax(abs(towards_right))), int(np.argmax(abs(towards_superior)))
    shift = -3.0 * directions[:, axis_r] * np.sign(towards_right[axis_r])
    shift -= 3.0 * directions[:, axis_s] * np.sign(towards_superior[axis_s])
    expected = affine[:3, :3] @ centre + affine[:3, 3] + shift  # LPS mm
    np.testing.assert_allclose(centroid, expected, atol=0.5)


def test_load_is_cached_per_process(bundles: Path, threshold_bundle: Path) -> None:
    sha = bundle_sha256(threshold_bundle)
    first = load_bundle(threshold_bundle, sha256=sha, allowed_dirs=[bundles], device="cpu")
    assert load_bundle(threshold_bundle, sha256=sha.upper(), allowed_dirs=[bundles], device="cpu") is first
    other = load_bundle(
        threshold_bundle,
        sha256=sha,
        allowed_dirs=[bundles],
        device="cpu",
        overrides={"inferer": {"_target_": "SimpleInferer"}},
    )
    assert other is not first


# --- classification -----------------------------------------------------------------------------


def test_classification_bundle_returns_class_probabilities(bundles: Path) -> None:
    from monai.networks.nets import Classifier

    inference = {
        "image_key": "image",
        "network_def": {
            "_target_": "Classifier",
            "in_shape": [1, 16, 16, 16],
            "classes": 2,
            "channels": [4, 8],
            "strides": [2, 2],
        },
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "@image_key"},
                {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
                {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
                {"_target_": "Resized", "keys": "@image_key", "spatial_size": [16, 16, 16]},
                {"_target_": "ScaleIntensityd", "keys": "@image_key"},
            ],
        },
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {"_target_": "Activationsd", "keys": "pred", "softmax": True},
    }
    torch.manual_seed(0)
    net = Classifier(in_shape=(1, 16, 16, 16), classes=2, channels=(4, 8), strides=(2, 2))
    bundle = _write_bundle(bundles / "cls", inference, {"0": "no_lesion", "1": "lesion"}, net)
    runtime = load_bundle(bundle, sha256=bundle_sha256(bundle), allowed_dirs=[bundles], device="cpu")
    prediction = runtime.predict(_volume(np.random.default_rng(0).normal(size=(30, 28, 12)), np.eye(4)))
    assert prediction.kind is BundleKind.CLASSIFICATION
    assert prediction.label_names == ("no_lesion", "lesion") and prediction.labels is None
    assert prediction.class_probabilities is not None and len(prediction.class_probabilities) == 2
    assert sum(prediction.class_probabilities) == pytest.approx(1.0, abs=1e-5)


# --- wholeBody (SegResNet, 105 channels) at 3 mm ------------------------------------------------


def test_wholebody_bundle_runs_unchanged_at_low_resolution(tmp_path: Path) -> None:
    bundle = tmp_path / "wholebody"
    shutil.copytree(WHOLEBODY, bundle)
    lowres = {"displayable_configs#highres": False}
    _random_weights(bundle, lowres, name="model_lowres.pt")  # what $modelname picks when not highres
    runtime = load_bundle(
        bundle, sha256=bundle_sha256(bundle), allowed_dirs=[tmp_path], device="cpu", overrides=lowres
    )
    assert len(runtime.label_names) == 105 and runtime.label_names[1] == "spleen"
    volume = _volume(np.random.default_rng(2).normal(0.0, 200.0, (64, 60, 24)), np.diag([1.5, 1.5, 4.0, 1.0]))
    prediction = runtime.predict(volume)
    assert prediction.labels is not None and prediction.labels.shape == (64, 60, 24)
    assert prediction.labels.max() < 105
    assert prediction.probabilities is None  # wholeBody inverts the label map, not the probabilities


# --- pinning and refusals -------------------------------------------------------------------------


def test_sha256_mismatch_names_both_hashes(bundles: Path) -> None:
    actual = bundle_sha256(bundles / "spleen")
    pinned = "0" * 64
    with pytest.raises(BundleError) as info:
        BundleRuntime.load(bundles / "spleen", sha256=pinned, allowed_dirs=[bundles])
    assert pinned in str(info.value) and actual in str(info.value)


def test_changed_weights_no_longer_match_the_pin(tmp_path: Path, threshold_bundle: Path) -> None:
    bundle = shutil.copytree(threshold_bundle, tmp_path / "b")
    pinned = bundle_sha256(bundle)
    weights = bundle / "models" / "model.pt"
    state = torch.load(weights, weights_only=True)
    state["bias"] = state["bias"] + 1.0
    torch.save(state, weights)
    with pytest.raises(BundleError, match="sha256 mismatch"):
        BundleRuntime.load(bundle, sha256=pinned, allowed_dirs=[tmp_path])


def test_sha256_covers_configs_and_models_only(tmp_path: Path, threshold_bundle: Path) -> None:
    bundle = shutil.copytree(threshold_bundle, tmp_path / "b")
    before = bundle_sha256(bundle)
    (bundle / "docs").mkdir()
    (bundle / "docs" / "README.md").write_text("notes")
    assert bundle_sha256(bundle) == before
    (bundle / "configs" / "extra.json").write_text("{}")
    assert bundle_sha256(bundle) != before


def test_bundle_outside_the_allowed_dirs_is_refused(tmp_path: Path, bundles: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    spleen = bundles / "spleen"
    with pytest.raises(BundleError, match="outside the allowed") as info:
        BundleRuntime.load(spleen, sha256=bundle_sha256(spleen), allowed_dirs=[allowed])
    assert str(spleen.resolve()) in str(info.value)
    # a symlink inside an allowed directory does not make the bundle inside it
    (allowed / "link").symlink_to(spleen)
    with pytest.raises(BundleError, match="outside the allowed"):
        BundleRuntime.load(allowed / "link", sha256=bundle_sha256(spleen), allowed_dirs=[allowed])


def test_missing_weights_are_refused(tmp_path: Path) -> None:
    bundle = tmp_path / "spleen"
    shutil.copytree(SPLEEN, bundle)
    with pytest.raises(BundleError, match="no weights"):
        BundleRuntime.load(bundle, sha256=bundle_sha256(bundle), allowed_dirs=[tmp_path])
    _random_weights(bundle, name="other.pt")  # models/ is not empty, but model.pt is missing
    with pytest.raises(BundleError, match=r"models/model\.pt"):
        BundleRuntime.load(bundle, sha256=bundle_sha256(bundle), allowed_dirs=[tmp_path])


def test_weights_that_do_not_fit_network_def_are_refused(tmp_path: Path) -> None:
    bundle = _write_bundle(
        tmp_path / "b", THRESHOLD_INFERENCE, {"0": "background", "1": "lesion"}, _threshold_net(3)
    )
    with pytest.raises(BundleError, match="state dict"):
        BundleRuntime.load(bundle, sha256=bundle_sha256(bundle), allowed_dirs=[tmp_path])


def test_macro_reading_another_file_is_refused(tmp_path: Path) -> None:
    inference = copy.deepcopy(THRESHOLD_INFERENCE)
    inference["inferer"] = "%/etc/other.json#inferer"
    bundle = _write_bundle(
        tmp_path / "b", inference, {"0": "background", "1": "lesion"}, torch.nn.Conv3d(1, 2, 1)
    )
    with pytest.raises(BundleError, match="reads another file"):
        BundleRuntime.load(bundle, sha256=bundle_sha256(bundle), allowed_dirs=[tmp_path])


def test_overrides_apply_and_unknown_ids_are_refused(bundles: Path) -> None:
    spleen = bundles / "spleen"
    sha = bundle_sha256(spleen)
    runtime = BundleRuntime.load(
        spleen, sha256=sha, allowed_dirs=[bundles], device="cpu", overrides={"inferer#sw_batch_size": 1}
    )
    assert runtime.inferer.sw_batch_size == 1
    with pytest.raises(BundleError, match="override 'nothing#here'"):
        BundleRuntime.load(spleen, sha256=sha, allowed_dirs=[bundles], overrides={"nothing#here": 1})


# --- GPU ------------------------------------------------------------------------------------------


@pytest.mark.gpu
@gpu
def test_spleen_on_cuda_with_amp(bundles: Path) -> None:
    from pipeline.geometry import load_volume

    spleen = bundles / "spleen"
    runtime = load_bundle(spleen, sha256=bundle_sha256(spleen), allowed_dirs=[bundles], device="cuda")
    assert runtime.device.type == "cuda" and runtime.amp
    volume = load_volume(sorted(ABDOMEN.glob("*.dcm")))
    prediction = runtime.predict(volume)
    assert prediction.labels is not None and prediction.labels.shape == volume.array.shape
    assert set(np.unique(prediction.labels)) <= {0, 1}
