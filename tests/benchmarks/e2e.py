"""End-to-end latency on CPU: last instance acknowledged -> SR received at the PACS, by stage.

    .venv/bin/python -m tests.benchmarks.e2e [--slices 64 300] [--bundle-dir DIR] [--quiet 2]

What runs: ``pacs-triage serve`` as a subprocess (SQLite, the default; one worker; CT routed to
the ``demo`` pipeline, i.e. the trained demo bundles) sending its results to a mock PACS in this
process (``daemon.demo.mock_pacs``, a pynetdicom C-STORE SCP that stamps each arrival). A 16-slice
warm-up study goes first, so the worker has imported torch/MONAI and loaded the bundles (that
cold start is reported on its own); then one phantom CT per size (512 x 512, 2.5 mm slices, one
lesion), each sent with ``daemon.dicom.scu.send_files`` on one association.

Where the times come from (one host, one clock): the last C-STORE response (this process), the
job's ``created_at`` (completion queued it), its ``running`` and ``succeeded`` audit rows (the
latter with the pipeline's seconds per stage, ``pipeline.runner.STAGES``), and the SR's arrival at
the mock PACS. ``daemon.service.timeline.breakdown`` turns them into rows that add up to the total. The
ratio printed is the share of the total spent in the pipeline's own stages: what is left is the
service around it (completion quiet period, polling, bookkeeping, sending).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from daemon.demo.mock_pacs import MockPacs
from daemon.dicom.scu import AssociationFailed, Peer, echo, send_files
from daemon.service.timeline import LOAD_MODELS, PIPELINE_GROUPS, WORKER_OVERHEAD, breakdown, job_timeline
from pipeline.demo.phantom import write_phantom_series
from storage.db import make_engine, make_session_factory
from storage.outbox import Outbox
from storage.queue import JobQueue, JobView

WARMUP_SLICES = 16
SEED = 7  # + the size's index: each study its own UIDs (one lesion each)
DEADLINE_S = 1800.0


@dataclass(frozen=True)
class Run:
    slices: int
    send_seconds: float
    rows: list[tuple[str, float]]
    total: float
    peak_rss_mib: float | None = None  # the worker's peak resident memory during the job

    @property
    def pipeline_seconds(self) -> float:
        labels = {label for label, _ in PIPELINE_GROUPS}
        return sum(seconds for label, seconds in self.rows if label in labels)


class Bench:
    def __init__(self, workdir: Path, quiet: float, bundle_dir: Path | None) -> None:
        self.workdir = workdir
        self.pacs = MockPacs(directory=workdir / "pacs").start()
        home = workdir / "home"
        self.port = _free_port()
        lines = [
            "[completion]",
            f"quiet_seconds = {quiet}",
            "sweep_interval_seconds = 0.5",
            "[workers]",
            "count = 1",
            "poll_seconds = 0.5",
            "lease_seconds = 600",
            "[dispatch]",
            "poll_seconds = 0.5",
            "[storage]",
            "min_free_bytes = 0",
            "[[routing.rules]]",
            'name = "ct-demo"',
            'pipeline = "demo"',
            'modality = ["CT"]',
        ]
        if bundle_dir is not None:
            lines += ["[pipelines]", f"demo_bundle_dir = {json.dumps(str(bundle_dir.resolve()))}"]
        config = workdir / "pacs-triage.toml"
        config.write_text("\n".join(lines) + "\n", encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_TRIAGE_")}
        env.update(
            PACS_TRIAGE_HOME=str(home),
            PACS_TRIAGE_PORT=str(self.port),
            PACS_TRIAGE_DESTINATION=self.pacs.peer,
            PACS_TRIAGE_LOGGING__LEVEL="WARNING",
        )
        self.log = (workdir / "serve.log").open("wb")
        script = Path(sys.executable).parent / "pacs-triage"
        self.process = subprocess.Popen(
            [str(script), "serve", "--config", str(config)],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.peer = Peer("PACS_TRIAGE", "127.0.0.1", self.port)
        self._wait_ready()
        engine = make_engine(f"sqlite:///{home / 'pacs-triage.db'}", pool_size=1)
        self.engine = engine
        self.queue = JobQueue(make_session_factory(engine))
        self.outbox = Outbox(make_session_factory(engine))

    def _wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if echo(self.peer, timeout=5) == 0:
                    return
            except AssociationFailed:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pacs-triage serve did not start; see {self.log.name}")
            time.sleep(0.2)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=120)
        self.engine.dispose()
        self.pacs.stop()

    def run(self, slices: int, seed: int, lesions: int) -> Run:
        folder = self.workdir / f"phantom-{slices}"
        truth = write_phantom_series(folder, seed=seed, lesions=lesions, slices=slices)
        files = sorted(folder.glob("*.dcm"))
        start = time.time()
        results = list(send_files(self.peer, files, calling_ae="BENCH_CT"))
        failed = [r for r in results if not r.ok]
        if failed:
            raise RuntimeError(f"{len(failed)} instances not stored: {failed[0].comment}")
        last_ack = time.time()
        uid = truth.study_instance_uid
        sr = self.pacs.wait_for(
            lambda r: r.modality == "SR" and r.study_instance_uid == uid,
            timeout=DEADLINE_S,
            progress=lambda s: print(f"  ... {slices} slices: {s:.0f} s", file=sys.stderr, flush=True),
            progress_every=30,
        )
        if sr is None:
            raise RuntimeError(
                f"no SR for the {slices}-slice study within {DEADLINE_S:.0f} s; see {self.log.name}"
            )
        job = self._job(uid)
        timeline = job_timeline(self.queue, self.outbox, job)
        rows = breakdown(timeline, last_ack=last_ack, report_received=sr.received_at)
        return Run(slices, last_ack - start, rows, sr.received_at - last_ack, timeline.peak_rss_mib)

    def _job(self, uid: str) -> JobView:
        job = next((j for j in self.queue.recent(limit=50) if j.study_instance_uid == uid), None)
        assert job is not None, uid
        return job


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def table(runs: list[Run], warmup: Run) -> str:
    head = ["stage (seconds)", *(f"{r.slices} slices" for r in runs)]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * len(runs) + "|"]
    labels = [label for label, _ in runs[0].rows]
    for index, label in enumerate(labels):
        lines.append(f"| {label} | " + " | ".join(f"{r.rows[index][1]:.1f}" for r in runs) + " |")
    lines.append(
        "| **last instance acknowledged -> SR at the PACS** | "
        + " | ".join(f"**{r.total:.1f}**" for r in runs)
        + " |"
    )
    lines.append(
        "| pipeline stages / total | "
        + " | ".join(f"{r.pipeline_seconds / r.total:.2f}" for r in runs)
        + " |"
    )
    lines.append(
        "| (before: sending the study, C-STORE) | " + " | ".join(f"{r.send_seconds:.1f}" for r in runs) + " |"
    )
    lines.append(
        "| worker peak RSS during the job (MiB) | "
        + " | ".join("?" if r.peak_rss_mib is None else f"{r.peak_rss_mib:.0f}" for r in runs)
        + " |"
    )
    lines.append(
        "| float32 source volume (MiB) | "
        + " | ".join(f"{512 * 512 * r.slices * 4 / 2**20:.0f}" for r in runs)
        + " |"
    )
    cold = dict(warmup.rows)
    lines.append("")
    lines.append(
        f"Cold start (the {warmup.slices}-slice warm-up study, sent as soon as serve answers C-ECHO, while the "
        f"worker is still importing torch/MONAI and loading the bundles at its start): total {warmup.total:.1f} s, "
        f"of which waiting for the worker {dict(warmup.rows)['queue wait (until a worker claimed the job)']:.1f} s, "
        f"loading models in the job {cold[LOAD_MODELS]:.1f} s, worker overhead {cold[WORKER_OVERHEAD]:.1f} s."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--slices", type=int, nargs="+", default=[64, 300])
    parser.add_argument("--quiet", type=float, default=2.0, help="completion quiet period (s)")
    parser.add_argument(
        "--bundle-dir", type=Path, default=None, help="demo bundles (default: the shipped ones)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pacs-triage-e2e-bench-") as tmp:
        bench = Bench(Path(tmp), args.quiet, args.bundle_dir)
        try:
            print("warm-up study ...", file=sys.stderr, flush=True)
            warmup = bench.run(WARMUP_SLICES, seed=3, lesions=0)
            runs = []
            for index, slices in enumerate(args.slices):
                print(f"{slices}-slice study ...", file=sys.stderr, flush=True)
                runs.append(bench.run(slices, seed=SEED + index, lesions=1))
        finally:
            bench.close()
    import torch

    print(
        f"quiet period {args.quiet:g} s, sweep 0.5 s, worker/dispatch poll 0.5 s, torch threads "
        f"{torch.get_num_threads()} (default), load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
        f"(1, 5, 15 min, at the end)"
    )
    print()
    print(table(runs, warmup))


if __name__ == "__main__":
    main()
