"""The demo pipeline: the committed phantom-trained bundles in ``pipeline/demo/bundles``, pinned.

``pipeline/demo/bundles/lesion_seg`` (liver lesion segmentation) and ``pipeline/demo/bundles/lesion_cls`` (lesion
present, probability) are trained by :mod:`pipeline.demo.training`. Their sha256 pins live in
``pipeline/demo/bundles/PINS.json``, a committed file: :func:`demo_spec` reads the pins from it and never
hashes the bundles to obtain them, so a bundle that changed after it was pinned fails to load
(BundleError) instead of being trusted silently. After retraining, re-pin deliberately:

    python -m pipeline.demo.bundle --pin     # writes PINS.json from the bundles as they are now

and commit the bundles and PINS.json together.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.bundle_runtime import bundle_sha256
from pipeline.errors import BundleError
from pipeline.measure import PriorityThresholds
from pipeline.orientation import Orientation
from pipeline.series_select import SelectionRule
from pipeline.spec import BundleSpec, PipelineSpec

__all__ = [
    "DEMO_BUNDLE_DIR",
    "DEMO_MIN_LESION_ML",
    "DEMO_PIPELINE",
    "DEMO_REPORTED",
    "DEMO_SELECTION",
    "DEMO_THRESHOLDS",
    "PINS_FILE",
    "demo_spec",
    "read_pins",
    "write_pins",
]

DEMO_BUNDLE_DIR = Path(__file__).resolve().parent / "bundles"
PINS_FILE = DEMO_BUNDLE_DIR / "PINS.json"
SEGMENTATION_BUNDLE = "lesion_seg"
CLASSIFICATION_BUNDLE = "lesion_cls"
DEMO_PIPELINE = "ct-liver-lesion-demo"
DEMO_VERSION = "1"  # bump when the demo pipeline's rule or thresholds change
_PIN_KEYS = (SEGMENTATION_BUNDLE, CLASSIFICATION_BUNDLE)

#: Axial CT of at least 16 slices, 0.5-5 mm thick: the phantoms (2.5 mm) and abdominal CT.
DEMO_SELECTION = SelectionRule(
    modalities=frozenset({"CT"}),
    orientations=frozenset({Orientation.AXIAL}),
    min_slices=16,
    slice_thickness_mm=(0.5, 5.0),
)
#: URGENT from 1 mL of lesion (the smallest size the demo model is specified to detect) or a lesion
#: probability of 0.9; STAT from 20 mL of lesion.
# Only the lesion channel and the "lesion present" class count: the classifier's channel 0 is a
# background score, which is near 1 for every lesion-free study.
DEMO_THRESHOLDS = PriorityThresholds(
    urgent_volume_ml=1.0,
    critical_volume_ml=20.0,
    urgent_probability=0.9,
    labels=frozenset({"lesion", "lesion present"}),
)
#: What the demo reports: the lesion channel and the "lesion present" class (not the background score).
DEMO_REPORTED = frozenset({"lesion", "lesion present"})
#: A lesion is a connected component of at least 0.5 mL (about 8 mm across); smaller specks are noise
#: of the demo model (pipeline.demo.metrics counts false positives from the same size).
DEMO_MIN_LESION_ML = 0.5


def read_pins(path: Path = PINS_FILE) -> dict[str, str]:
    """The pinned sha256 of each demo bundle, from ``PINS.json``."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(
            f"{path} does not exist: the demo bundles are not pinned; train them "
            "(python -m pipeline.demo.training) and pin them (python -m pipeline.demo.bundle --pin)"
        ) from None
    except ValueError as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from exc
    pins = raw.get("sha256") if isinstance(raw, dict) else None
    if not isinstance(pins, dict) or any(not isinstance(pins.get(k), str) for k in _PIN_KEYS):
        raise BundleError(f"{path} must hold {{'sha256': {{{', '.join(repr(k) for k in _PIN_KEYS)}: hex}}}}")
    return {k: str(pins[k]) for k in _PIN_KEYS}


def demo_spec(
    *,
    device: str | None = None,
    make_seg: bool = True,
    with_classification: bool = True,
    bundle_dir: Path = DEMO_BUNDLE_DIR,
) -> PipelineSpec:
    """The demo pipeline on the committed, pinned bundles (``bundle_dir`` holds them and PINS.json)."""
    pins = read_pins(bundle_dir / PINS_FILE.name)
    allowed = (bundle_dir,)
    segmentation = BundleSpec(
        path=bundle_dir / SEGMENTATION_BUNDLE,
        sha256=pins[SEGMENTATION_BUNDLE],
        allowed_dirs=allowed,
        device=device,
    )
    classification = BundleSpec(
        path=bundle_dir / CLASSIFICATION_BUNDLE,
        sha256=pins[CLASSIFICATION_BUNDLE],
        allowed_dirs=allowed,
        device=device,
    )
    return PipelineSpec(
        name=DEMO_PIPELINE,
        version=DEMO_VERSION,
        selection=DEMO_SELECTION,
        segmentation=segmentation,
        classification=classification if with_classification else None,
        thresholds=DEMO_THRESHOLDS,
        make_seg=make_seg,
        reported=DEMO_REPORTED,
        min_lesion_ml=DEMO_MIN_LESION_ML,
    )


def write_pins(bundle_dir: Path = DEMO_BUNDLE_DIR) -> dict[str, str]:
    """Hash the demo bundles as they are now and write ``PINS.json`` (a deliberate act: review, commit)."""
    pins = {name: bundle_sha256(bundle_dir / name) for name in _PIN_KEYS}
    content = {"algorithm": "pipeline.bundle_runtime.bundle_sha256", "sha256": pins}
    (bundle_dir / PINS_FILE.name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    return pins


def main(argv: list[str] | None = None) -> None:
    """``python -m pipeline.demo.bundle [--pin]``: show the demo spec, or re-pin the bundles first."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--pin", action="store_true", help="write PINS.json from the bundles as they are now")
    parser.add_argument("--bundle-dir", type=Path, default=DEMO_BUNDLE_DIR)
    args = parser.parse_args(argv)
    if args.pin:
        for name, digest in write_pins(args.bundle_dir).items():
            print(f"pinned {name}: {digest}")
    spec = demo_spec(bundle_dir=args.bundle_dir)
    print(f"pipeline {spec.name} v{spec.version} (identity {spec.identity()}): {spec.selection.describe()}")
    for bundle in (spec.segmentation, spec.classification):
        if bundle is not None:
            print(f"  {bundle.path.name}: sha256 {bundle.sha256}")


if __name__ == "__main__":
    main()
