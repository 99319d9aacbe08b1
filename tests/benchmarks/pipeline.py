"""Pipeline benchmark on CPU: per-stage time and peak RSS for a 300-slice 512x512 CT.

    .venv/bin/python -m tests.benchmarks.pipeline [--slices 300] [--rounds 3] [--skip-spleen]

A script, not a test (tests never assert on wall-clock time). It writes a phantom CT series
(``pipeline.demo.phantom``, 512x512, 2.5 mm, Explicit VR Little Endian, ~0.5 MB a slice) into a temporary
directory, removed afterwards, and measures:

- **decode**, side by side on the same files: the limit (every byte read from disk, by ``cat`` to
  /dev/null and by a Python ``readinto`` loop), the baseline to beat (a naive pydicom loop:
  ``dcmread`` + ``pixel_array`` + ``np.stack``, then rescaled to float32 HU like ours), and ours
  (``pipeline.geometry.load_volume``: headers, geometry checks, threaded decode into the volume).
  Each with the files in the page cache ("warm": a study just received) and evicted from it with
  ``posix_fadvise(DONTNEED)`` ("cold"). Medians over ``--rounds``.
- **the model stages** for (a) the demo bundle ``pipeline/demo/bundles/lesion_seg`` (its own
  architecture with random weights when it is not trained yet) and (b) the real
  ``spleen_ct_segmentation`` configs from ``shared/bundles`` with random weights: preprocessing (the
  bundle's transforms: orientation, spacing, intensity), inference (the bundle's inferer: sliding
  window), postprocessing (the bundle's postprocessing: activation, Invertd back to the source grid,
  argmax), then our measurement (components, diameters) and writers (SR + SEG). The stages are the
  components that ``BundleRuntime.predict`` runs, called one by one exactly as it calls them.

Peak RSS: the largest resident set size of this process during the stage (psutil, sampled every
5 ms in a thread), and how far it rose above the RSS at the stage's start. Torch uses every core it
may (``torch.get_num_threads()``); so does ``load_volume``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pydicom
import torch

from pipeline.bundle_runtime import (
    BundleKind,
    BundleRuntime,
    Prediction,
    bundle_sha256,
    clear_bundle_cache,
    load_bundle,
)
from pipeline.demo.phantom import write_phantom_series
from pipeline.findings import AlgorithmInfo
from pipeline.geometry import load_volume
from pipeline.measure import PriorityThresholds, findings_from_prediction
from pipeline.volume import Volume
from pipeline.writers.seg import write_seg
from pipeline.writers.sr import write_sr
from tests.paths import BUNDLES, REPO

GIB = 1024**3
DEMO_BUNDLE = REPO / "pipeline" / "demo" / "bundles" / "lesion_seg"
SPLEEN = BUNDLES / "spleen_ct_segmentation"


# --- measuring -----------------------------------------------------------------------------------


class RssSampler:
    """Samples this process's RSS in a thread; ``peak()`` since the last ``reset()``."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.process = psutil.Process()
        self.interval_s = interval_s
        self._peak = self.process.memory_info().rss
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            rss = self.process.memory_info().rss
            with self._lock:
                self._peak = max(self._peak, rss)

    def reset(self) -> int:
        rss = self.process.memory_info().rss
        with self._lock:
            self._peak = rss
        return rss

    def peak(self) -> int:
        rss = self.process.memory_info().rss
        with self._lock:
            self._peak = max(self._peak, rss)
            return self._peak

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Stage:
    name: str
    seconds: float
    peak_rss: int
    rss_rise: int
    note: str = ""


@contextlib.contextmanager
def measured(sampler: RssSampler, stages: list[Stage], name: str, note: str = "") -> Iterator[None]:
    start_rss = sampler.reset()
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    peak = sampler.peak()
    stages.append(Stage(name, seconds, peak, peak - start_rss, note))


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache (a cold read comes from the disk again)."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# --- decode: the limit, the baseline, ours -------------------------------------------------------


def read_all(files: list[Path]) -> int:
    buffer = bytearray(2 * 1024 * 1024)
    view = memoryview(buffer)
    total = 0
    for path in files:
        with path.open("rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


def cat_all(files: list[Path]) -> None:
    with open(os.devnull, "wb") as null:
        subprocess.run(["cat", *map(str, files)], stdout=null, check=True)


def naive_pydicom(files: list[Path]) -> np.ndarray:
    """The baseline: one dcmread per file, pixel_array, np.stack, rescale to float32."""
    datasets = [pydicom.dcmread(p) for p in files]
    stack = np.stack([ds.pixel_array for ds in datasets])
    slope, intercept = float(datasets[0].RescaleSlope), float(datasets[0].RescaleIntercept)
    return stack.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def decode_rows(
    files: list[Path], rounds: int, sampler: RssSampler
) -> list[tuple[str, str, float, int, float]]:
    """(method, cache, median seconds, peak RSS rise, MB/s) for each method and cache state."""
    total_bytes = sum(p.stat().st_size for p in files)
    methods: list[tuple[str, Callable[[], object]]] = [
        ("read every byte (`cat` > /dev/null): the limit", lambda: cat_all(files)),
        ("read every byte (Python `readinto`)", lambda: read_all(files)),
        (
            "naive pydicom loop (`dcmread` + `pixel_array` + `np.stack` + rescale)",
            lambda: naive_pydicom(files),
        ),
        ("ours: `load_volume` (headers, geometry checks, threaded decode)", lambda: load_volume(files)),
    ]
    rows = []
    for cache in ("warm", "cold"):
        for name, fn in methods:
            times, rises = [], []
            for _ in range(rounds):
                if cache == "cold":
                    evict(files)
                else:
                    read_all(files)
                start_rss = sampler.reset()
                start = time.perf_counter()
                result = fn()
                times.append(time.perf_counter() - start)
                rises.append(sampler.peak() - start_rss)
                del result
            seconds = statistics.median(times)
            rows.append((name, cache, seconds, max(rises), total_bytes / seconds / 1e6))
    return rows


# --- the model stages ----------------------------------------------------------------------------


def random_weights(bundle: Path) -> None:
    """A random initialisation of the bundle's own network_def, saved as its weights."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    torch.manual_seed(0)
    (bundle / "models").mkdir(exist_ok=True)
    torch.save(parser.get_parsed_content("network_def").state_dict(), bundle / "models" / "model.pt")


def demo_bundle(root: Path, source: Path = DEMO_BUNDLE) -> tuple[Path, str]:
    """The trained demo bundle when present, else its architecture with random weights."""
    if (source / "models").is_dir():
        shutil.copytree(source, root / "lesion_seg")
        return root / "lesion_seg", "demo `lesion_seg` (trained weights)"
    import json

    from pipeline.demo.bundle_configs import metadata, seg_config

    bundle = root / "lesion_seg"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "configs" / "inference.json").write_text(json.dumps(seg_config()))
    (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata(BundleKind.SEGMENTATION)))
    random_weights(bundle)
    return bundle, "demo `lesion_seg` architecture (random weights: bundle not trained yet)"


def spleen_bundle(root: Path) -> tuple[Path, str]:
    shutil.copytree(SPLEEN, root / "spleen", ignore=shutil.ignore_patterns("docs", "*.yml", "LICENSE"))
    random_weights(root / "spleen")
    return (
        root / "spleen",
        "spleen_ct_segmentation configs, random weights (UNet 4.8 M, 1.5x1.5x2 mm, 96^3 windows)",
    )


def model_stages(
    runtime: BundleRuntime, volume: Volume, headers: list[pydicom.Dataset], sampler: RssSampler
) -> list[Stage]:
    """The stages of ``BundleRuntime.predict``, one by one, then measurement and the writers."""
    stages: list[Stage] = []
    with torch.no_grad():
        with measured(sampler, stages, "preprocessing"):
            # predict() feeds exactly this: the in-memory volume as an LPS MetaTensor, then the
            # bundle's own transforms.
            data = runtime.preprocessing({runtime.image_key: runtime._image(volume)})
            image = data[runtime.image_key] = data[runtime.image_key].to(runtime.device)
        shape = tuple(image.shape[1:])
        with measured(sampler, stages, "inference", f"network grid {'x'.join(map(str, shape))}"):
            batch = torch.as_tensor(image).as_subclass(torch.Tensor).unsqueeze(0)
            output = runtime.inferer(batch, runtime.network)
            data["pred"] = output[0].float()
            del batch, output
        with measured(
            sampler, stages, "postprocessing", "activation, Invertd to 512x512 source grid, argmax"
        ):
            prediction = runtime._segmentation(data, volume, "benchmark")
            del data, image
    stages += output_stages(prediction, volume, headers, sampler)
    return stages


def output_stages(
    prediction: Prediction, volume: Volume, headers: list[pydicom.Dataset], sampler: RssSampler
) -> list[Stage]:
    """Measurement (components, diameters) and the writers, on one prediction."""
    stages: list[Stage] = []
    labels = prediction.labels
    assert labels is not None
    share = np.count_nonzero(labels) / labels.size
    with measured(sampler, stages, "measure", f"{100 * share:.2g} % of the voxels labelled"):
        result = findings_from_prediction(prediction, volume, PriorityThresholds(urgent_volume_ml=1.0))
    findings, lesion_map = result.findings, result.lesion_map
    when = datetime.datetime(2026, 1, 1)  # the analysis time: any fixed one
    seg = None
    if findings.findings and lesion_map is not None:
        with measured(sampler, stages, "write SEG", f"{len(findings.findings)} segment(s)"):
            seg = write_seg(
                lesion_map, volume, headers, findings, input_fingerprint="benchmark", content_datetime=when
            )
    try:
        with measured(sampler, stages, "write SR", f"{len(headers)} source references"):
            write_sr(findings, headers, volume, input_fingerprint="benchmark", seg=seg, content_datetime=when)
    except Exception as exc:  # a writer's bug must not hide the other figures
        stages.append(Stage("write SR", 0.0, 0, 0, f"**failed**: {type(exc).__name__}: {exc}"))
    return stages


def ground_truth_prediction(series: Path) -> Prediction:
    """The phantom's lesion mask as a perfect model's output (what measure and write see in practice)."""
    mask = np.load(series / "ground_truth_mask.npy")
    return Prediction(
        kind=BundleKind.SEGMENTATION,
        label_names=("background", "lesion"),
        algorithm=AlgorithmInfo(name="ground truth", version="0", sha256="0" * 64, pipeline="benchmark"),
        labels=(mask > 0).astype(np.uint8),
    )


# --- report --------------------------------------------------------------------------------------


def fmt_gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each decode measurement (median)")
    parser.add_argument("--skip-spleen", action="store_true")
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--demo-bundle", type=Path, default=DEMO_BUNDLE, help="the lesion_seg bundle to time")
    args = parser.parse_args()

    sampler = RssSampler()
    work = Path(tempfile.mkdtemp(prefix="pacs-triage-bench-"))
    try:
        start = time.perf_counter()
        series = work / "series"
        write_phantom_series(series, seed=1, lesions=2, slices=args.slices)
        files = sorted(series.glob("*.dcm"))
        total_mb = sum(p.stat().st_size for p in files) / 1e6
        print(
            f"phantom: {len(files)} slices, {total_mb:.0f} MB, written in {time.perf_counter() - start:.1f} s"
        )
        cpu = platform.processor() or platform.machine()
        print(
            f"machine: {len(os.sched_getaffinity(0))} usable cores ({cpu}), torch {torch.__version__} "
            f"with {torch.get_num_threads()} threads, {psutil.virtual_memory().total / GIB:.0f} GiB RAM, "
            f"load average {os.getloadavg()[0]:.1f}"
        )

        decode = decode_rows(files, args.rounds, sampler)
        volume_nbytes = 512 * 512 * len(files) * 4
        print(
            f"\n### Decode: {len(files)} slices, {total_mb:.0f} MB on disk, float32 volume {volume_nbytes / GIB:.2f} GiB\n"
        )
        print(
            "| method | page cache | time (s) | MB/s | peak RSS rise (GiB) | vs naive pydicom | vs the limit (`cat`) |"
        )
        print("|---|---|---:|---:|---:|---:|---:|")
        for cache in ("warm", "cold"):
            rows = [r for r in decode if r[1] == cache]
            naive = next(r[2] for r in rows if r[0].startswith("naive"))
            limit = next(r[2] for r in rows if "cat" in r[0])
            for name, _, seconds, rise, mbps in rows:
                print(
                    f"| {name} | {cache} | {seconds:.2f} | {mbps:.0f} | {fmt_gib(rise)} | "
                    f"{naive / seconds:.2f}x | {seconds / limit:.1f}x |"
                )

        start_rss = sampler.reset()
        start = time.perf_counter()
        volume = load_volume(files)
        load_s, load_peak = time.perf_counter() - start, sampler.peak()
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
        by_uid = {str(ds.SOPInstanceUID): ds for ds in headers}
        headers = [by_uid[ref.sop_instance_uid] for ref in volume.source_instances]

        bundles_dir = work / "bundles"
        bundles_dir.mkdir()
        chosen = []
        if not args.skip_demo:
            chosen.append(demo_bundle(bundles_dir, args.demo_bundle))
        if not args.skip_spleen:
            chosen.append(spleen_bundle(bundles_dir))
        for bundle, title in chosen:
            clear_bundle_cache()
            t = time.perf_counter()
            runtime = load_bundle(
                bundle, sha256=bundle_sha256(bundle), allowed_dirs=[bundles_dir], device="cpu"
            )
            loaded_s = time.perf_counter() - t
            stages = [
                Stage(
                    "decode (`load_volume`)", load_s, load_peak, load_peak - start_rss, "as above, warm cache"
                ),
                *model_stages(runtime, volume, headers, sampler),
            ]
            total = sum(s.seconds for s in stages)
            print(
                f"\n### {title}\n\nbundle loaded (parse, build, weights) in {loaded_s:.1f} s, once per worker.\n"
            )
            print("| stage | time (s) | share | peak RSS (GiB) | RSS rise in stage (GiB) | note |")
            print("|---|---:|---:|---:|---:|---|")
            for s in stages:
                print(
                    f"| {s.name} | {s.seconds:.1f} | {100 * s.seconds / total:.0f} % | {fmt_gib(s.peak_rss)} | "
                    f"{fmt_gib(s.rss_rise)} | {s.note} |"
                )
            print(f"| **total** | **{total:.1f}** | | | | |")
            del runtime
        truth = output_stages(ground_truth_prediction(series), volume, headers, sampler)
        print(
            "\n### Measure and write on the phantom's ground-truth lesions (what a working model outputs)\n"
        )
        print("| stage | time (s) | peak RSS (GiB) | RSS rise in stage (GiB) | note |")
        print("|---|---:|---:|---:|---|")
        for s in truth:
            print(
                f"| {s.name} | {s.seconds:.2f} | {fmt_gib(s.peak_rss)} | {fmt_gib(s.rss_rise)} | {s.note} |"
            )
    finally:
        sampler.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
