"""Time to result of the demo pipeline on a CUDA GPU with AMP, and its peak GPU memory (issue 15).

    .venv/bin/python -m tests.benchmarks.gpu [--slices 64 300] [--rounds 3] [--invert-labels]

One command, under 5 minutes on a CUDA machine (it stops starting new rounds after
``--budget-seconds``, 240 by default). Without CUDA it says so and exits with status 2: it never
falls back to the CPU (tests/benchmarks/pipeline.py and e2e.py are the CPU benchmarks).

What runs: the ``demo`` pipeline (``pipeline.demo.bundle.demo_spec``, the committed, pinned
bundles) through ``pipeline.runner.run``, in this process, on ``cuda`` with AMP (float16 autocast,
the default of a pipeline on CUDA), on phantom CT series written to a temporary folder (512 x 512,
2.5 mm slices, one lesion). Timed per round: the runner's stages (select, load, headers, bundles,
inference, measure, write) and their total, which is the pipeline's share of "last instance ->
SR at the PACS" (the service around it, completion quiet period and sending, is what e2e.py adds).
Before the rounds: loading the two bundles onto the GPU (the worker does it once, at its start)
and one 16-slice warm-up run (CUDA context, cuDNN autotuning).

Memory: ``torch.cuda.max_memory_allocated`` (tensors) and ``max_memory_reserved`` (what the caching
allocator holds, what ``nvidia-smi`` shows minus the context) per round, reset before each; and the
process's peak resident memory (host).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

WARMUP_SLICES = 16
SEED = 7
EXIT_NO_CUDA = 2


def _no_cuda_reason() -> str | None:
    import torch

    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no CUDA device"
    return None


@dataclasses.dataclass(frozen=True)
class Round:
    slices: int
    stages: dict[str, float]
    total: float
    gpu_allocated: int
    gpu_reserved: int
    host_peak: int


def _run_once(files: list[Path], spec: object, slices: int) -> Round:
    import torch

    from daemon.service.memory import start_peak_rss
    from pipeline import runner

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    host = start_peak_rss()
    started = time.perf_counter()
    result = runner.run(
        files,
        spec,  # type: ignore[arg-type]
        input_fingerprint=f"gpu-benchmark-{slices}",
        analysis_started=datetime.datetime(2026, 1, 1, 12, 0, 0),
    )
    torch.cuda.synchronize()
    total = time.perf_counter() - started
    return Round(
        slices=slices,
        stages=dict(result.timings),
        total=total,
        gpu_allocated=torch.cuda.max_memory_allocated(),
        gpu_reserved=torch.cuda.max_memory_reserved(),
        host_peak=host.peak().bytes,
    )


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def table(rounds: list[Round]) -> str:
    from pipeline.runner import STAGES

    sizes = sorted({r.slices for r in rounds})
    by_size = {s: [r for r in rounds if r.slices == s] for s in sizes}
    med = {
        s: min(by_size[s], key=lambda r: abs(r.total - statistics.median(x.total for x in by_size[s])))
        for s in sizes
    }
    head = ["(median round)", *(f"{s} slices" for s in sizes)]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * len(sizes) + "|"]
    for stage in STAGES:
        lines.append(
            f"| {stage} (s) | " + " | ".join(f"{med[s].stages.get(stage, 0.0):.2f}" for s in sizes) + " |"
        )
    lines.append("| **pipeline total (s)** | " + " | ".join(f"**{med[s].total:.2f}**" for s in sizes) + " |")
    lines.append(
        "| rounds (s) | " + " | ".join(", ".join(f"{r.total:.2f}" for r in by_size[s]) for s in sizes) + " |"
    )
    lines.append("| peak GPU memory allocated (GiB) | " + " | ".join(_gib(max(r.gpu_allocated for r in by_size[s])) for s in sizes) + " |")  # fmt: skip
    lines.append("| peak GPU memory reserved (GiB) | " + " | ".join(_gib(max(r.gpu_reserved for r in by_size[s])) for s in sizes) + " |")  # fmt: skip
    lines.append("| peak host RSS (GiB) | " + " | ".join(_gib(max(r.host_peak for r in by_size[s])) for s in sizes) + " |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--slices", type=int, nargs="+", default=[64, 300])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per size (median reported)")
    parser.add_argument("--device", default="cuda", help="a CUDA device, e.g. cuda:1 (default: cuda)")
    parser.add_argument("--invert-labels", action="store_true", help="the invert_labels speed option")
    parser.add_argument("--no-amp", action="store_true", help="float32 instead of float16 autocast")
    parser.add_argument("--budget-seconds", type=float, default=240.0, help="start no round after this")
    args = parser.parse_args(argv)
    begun = time.monotonic()

    reason = _no_cuda_reason()
    if reason is not None or not args.device.startswith("cuda"):
        print(
            f"tests/benchmarks/gpu.py needs a CUDA GPU: {reason or f'--device {args.device} is not CUDA'}. "
            "Run it on a machine with an NVIDIA GPU and a CUDA build of torch; the CPU benchmarks are "
            "tests/benchmarks/pipeline.py and tests/benchmarks/e2e.py.",
            file=sys.stderr,
        )
        return EXIT_NO_CUDA

    import torch

    from pipeline import runner
    from pipeline.demo.bundle import demo_spec
    from pipeline.demo.phantom import write_phantom_series

    base = demo_spec(device=args.device)
    segmentation = dataclasses.replace(
        base.segmentation, amp=not args.no_amp, invert_labels=args.invert_labels
    )
    assert base.classification is not None
    classification = dataclasses.replace(base.classification, amp=not args.no_amp)
    spec = dataclasses.replace(base, segmentation=segmentation, classification=classification)

    print(
        f"device: {torch.cuda.get_device_name(args.device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    )
    with tempfile.TemporaryDirectory(prefix="pacs-triage-gpu-bench-") as tmp:
        series: dict[int, list[Path]] = {}
        for index, slices in enumerate([WARMUP_SLICES, *args.slices]):
            folder = Path(tmp) / f"phantom-{slices}"
            write_phantom_series(
                folder, seed=SEED + index, lesions=0 if slices == WARMUP_SLICES else 1, slices=slices
            )
            series[slices] = sorted(folder.glob("*.dcm"))
        print(f"phantoms written in {time.monotonic() - begun:.1f} s", file=sys.stderr, flush=True)

        started = time.perf_counter()
        for bundle in (segmentation, classification):
            runner._runtime(bundle)  # what a worker does at its start
        torch.cuda.synchronize()
        load = time.perf_counter() - started
        warm = _run_once(series[WARMUP_SLICES], spec, WARMUP_SLICES)

        rounds: list[Round] = []
        skipped = 0
        for _ in range(args.rounds):
            for slices in args.slices:
                if time.monotonic() - begun > args.budget_seconds:
                    skipped += 1
                    continue
                rounds.append(_run_once(series[slices], spec, slices))
                print(f"  {slices} slices: {rounds[-1].total:.2f} s", file=sys.stderr, flush=True)
    if not rounds:
        print("no round finished within the budget", file=sys.stderr)
        return 1
    options = ("AMP float16" if not args.no_amp else "float32") + (
        ", invert_labels" if args.invert_labels else ""
    )
    print(f"demo pipeline on {args.device} ({options}); bundles loaded in {load:.2f} s; "
          f"{WARMUP_SLICES}-slice warm-up {warm.total:.2f} s; {len(rounds)} rounds"
          + (f", {skipped} skipped (budget)" if skipped else ""))  # fmt: skip
    print()
    print(table(rounds))
    print(f"\nwall time {time.monotonic() - begun:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
