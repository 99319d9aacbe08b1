"""Bundle-local code: each bundle's ``scripts`` package is its own, pinned, and leaks into nothing.

Two bundles made here both name ``scripts.nets.Net`` as their network, with different code: one
labels every voxel 1, the other 0. A host module already called ``scripts`` must survive both.
"""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.bundle_runtime import BundleRuntime, bundle_sha256
from pipeline.errors import BundleError
from pipeline.volume import InstanceRef, Volume

NETS = """
import torch
from .helpers import WINNER

class Net(torch.nn.Module):
    def forward(self, x):
        out = torch.zeros((x.shape[0], 2, *x.shape[2:]), dtype=x.dtype)
        out[:, WINNER] = 1.0
        return out
"""


def _bundle(root: Path, winner: int) -> Path:
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "scripts").mkdir()
    (root / "scripts" / "__init__.py").write_text("")
    (root / "scripts" / "nets.py").write_text(NETS)
    (root / "scripts" / "helpers.py").write_text(f"WINNER = {winner}\n")
    meta = {"name": root.name, "version": "1", "network_data_format": {"outputs": {"pred": {"channel_def": {"0": "background", "1": "lesion"}}}}}  # fmt: skip
    inference = {
        "image_key": "image",
        "network_def": {"_target_": "scripts.nets.Net"},
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "@image_key"},
                {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
            ],
        },
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [{"_target_": "AsDiscreted", "keys": "pred", "argmax": True}],
        },
    }
    (root / "configs" / "metadata.json").write_text(json.dumps(meta))
    (root / "configs" / "inference.json").write_text(json.dumps(inference))
    torch.save({}, root / "models" / "model.pt")  # Net has no parameters
    return root


def _volume() -> Volume:
    refs = tuple(InstanceRef("1.2.840.10008.5.1.4.1.1.2", f"2.25.{k + 1}") for k in range(4))
    return Volume(np.zeros((6, 5, 4), np.float32), np.eye(4), "2.25.10", "2.25.11", "2.25.12", "CT", refs)


def _load(bundle: Path) -> BundleRuntime:
    return BundleRuntime.load(
        bundle, sha256=bundle_sha256(bundle), allowed_dirs=[bundle.parent], device="cpu"
    )


@pytest.fixture
def host_scripts() -> Iterator[types.ModuleType]:
    """A module called ``scripts`` that the host already had (restored whatever happens)."""
    saved = {n: m for n, m in sys.modules.items() if n == "scripts" or n.startswith("scripts.")}
    host = types.ModuleType("scripts")
    sys.modules["scripts"] = host
    try:
        yield host
    finally:
        for name in [n for n in sys.modules if n == "scripts" or n.startswith("scripts.")]:
            del sys.modules[name]
        sys.modules.update(saved)


def test_two_bundles_each_import_their_own_scripts(tmp_path: Path, host_scripts: types.ModuleType) -> None:
    one = _load(_bundle(tmp_path / "one", winner=1))
    assert sys.modules["scripts"] is host_scripts and "scripts.nets" not in sys.modules
    zero = _load(_bundle(tmp_path / "zero", winner=0))
    for _ in range(2):  # alternating: each keeps its own modules, none leaks into the other
        one_labels = one.predict(_volume()).labels
        zero_labels = zero.predict(_volume()).labels
        assert one_labels is not None and zero_labels is not None
        assert bool((one_labels == 1).all()) and bool((zero_labels == 0).all())
        assert sys.modules["scripts"] is host_scripts
        assert not [n for n in sys.modules if n.startswith("scripts.")]
    assert type(one.network).__module__ == "scripts.nets" and type(one.network) is not type(zero.network)


def test_bundle_scripts_are_pinned(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "b", winner=1)
    pinned = bundle_sha256(bundle)
    (bundle / "scripts" / "helpers.py").write_text("WINNER = 0\n")
    assert bundle_sha256(bundle) != pinned
    with pytest.raises(BundleError, match="sha256 mismatch"):
        BundleRuntime.load(bundle, sha256=pinned, allowed_dirs=[tmp_path], device="cpu")


def test_a_missing_bundle_module_is_a_bundle_error_naming_it(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "b", winner=1)
    (bundle / "scripts" / "nets.py").write_text("from .absent import Thing\n")
    with pytest.raises(BundleError, match=r"scripts\.absent"):
        _load(bundle)
    assert "scripts" not in sys.modules
