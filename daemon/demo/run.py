"""``pacs-triage demo``: the whole product once, on this machine, in a throw-away data directory.

    mock PACS (pynetdicom SCP) ◀──SR, SEG, key images, KOS── dispatcher
         ▲                                    │
         │                                    │
    phantom CT ──C-STORE──▶ receiver ──▶ completion ──▶ job ──▶ worker (demo pipeline)

It starts a mock PACS and the service (receiver, scheduler, dispatchers, one worker) with
embedded defaults in a temporary home, routes CT to the ``demo`` pipeline (the phantom-trained
bundles shipped with pacs-triage), sends a synthetic abdominal CT with lesions of known volume,
waits for the SR at the mock PACS, and prints its findings next to the ground truth and where
the time went. Exit status 0 only when the SR arrived and matches the truth.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from daemon.config import Config, load_config
from daemon.demo.mock_pacs import MockPacs, Received
from daemon.dicom.scu import Peer, send_files
from daemon.logs import setup_logging
from daemon.service.timeline import breakdown, job_timeline
from pipeline.demo.phantom import GroundTruth, write_phantom_series
from pipeline.writers.sr_reader import ReportedFinding, SrReport, read_sr
from storage.db import make_engine, make_session_factory
from storage.models import JobState
from storage.outbox import Outbox
from storage.queue import JobQueue, JobView
from vocabulary import Priority

EXIT_OK = 0
EXIT_MISMATCH = 1  # the SR did not arrive in time, or does not match the ground truth
EXIT_NO_BUNDLE = 3  # the trained demo bundles are not there

SEG_GRACE_SECONDS = 15.0  # the SEG is a separate delivery; wait this long for it after the SR
PROGRESS_SECONDS = 5.0
CALLING_AE = "DEMO_CT"
SR_MODALITY = "SR"
SEG_MODALITY = "SEG"
KOS_MODALITY = "KO"


@dataclass(frozen=True, kw_only=True)
class DemoOptions:
    seed: int = 26  # one lesion of 11.6 mL
    lesions: int = 1
    slices: int = 64
    quiet_seconds: float = 2.0
    timeout_seconds: float = 300.0
    tolerance: float = 0.15  # |found - true| / true of each lesion's volume
    home: Path | None = None  # keep everything here; None: a temporary directory, removed after
    bundle_dir: Path | None = None  # demo bundles; None: the ones shipped with pacs-triage
    verbose: bool = False


@dataclass(frozen=True)
class Verdict:
    ok: bool
    lines: tuple[str, ...]


Echo = Callable[[str], None]


def check_bundles(bundle_dir: Path | None) -> str | None:
    """Why the demo pipeline cannot run (the trained bundles are absent or unpinned), or None."""
    from pipeline.demo.bundle import DEMO_BUNDLE_DIR, demo_spec
    from pipeline.errors import PipelineError

    where = bundle_dir or DEMO_BUNDLE_DIR
    try:
        spec = demo_spec(bundle_dir=where)
    except (PipelineError, ValueError) as exc:
        return (
            f"the trained demo bundles are not there yet, so there is nothing to demonstrate.\n"
            f"  {exc}\n"
            f"  The demo pipeline runs the phantom-trained bundles in {where} (lesion_seg/, lesion_cls/,\n"
            f"  PINS.json). Train them:  python -m pipeline.demo.training --out {where}\n"
            f"  then pin them:          python -m pipeline.demo.bundle --pin --bundle-dir {where}"
        )
    missing = [b.path for b in (spec.segmentation, spec.classification) if b and not b.path.is_dir()]
    if missing:
        return f"the trained demo bundles are not there yet: {', '.join(map(str, missing))} missing"
    return None


def demo_config(home: Path, port: int, pacs: MockPacs, options: DemoOptions) -> Config:
    """Embedded defaults plus what the demo needs; the caller's PACS_TRIAGE_* settings are ignored."""
    lines = [
        f"home = {json.dumps(str(home))}",
        f"port = {port}",
        f'destination = "{pacs.peer}"',
        "[completion]",
        f"quiet_seconds = {options.quiet_seconds}",
        "sweep_interval_seconds = 0.5",
        "[workers]",
        "count = 1",
        "poll_seconds = 0.5",
        "[dispatch]",
        "poll_seconds = 0.5",
        "[storage]",
        'min_free_bytes = "64MiB"',
        "[logging]",
        f'level = "{"INFO" if options.verbose else "WARNING"}"',
        "[[routing.rules]]",
        'name = "ct-demo"',
        'pipeline = "demo"',
        'modality = ["CT"]',
    ]
    if options.bundle_dir is not None:
        lines += ["[pipelines]", f"demo_bundle_dir = {json.dumps(str(options.bundle_dir.resolve()))}"]
    path = home / "demo.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return load_config(path, environ={})


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Service:
    """``daemon.service.serve.serve`` in a thread of this process (its worker is a process of its own)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.ready = threading.Event()
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="pacs-triage-serve", daemon=True)

    def _run(self) -> None:
        from daemon.service.serve import serve

        try:
            serve(self.config, workers=1, ready=self.ready, stop=self.stop_event)
        except BaseException as exc:  # noqa: BLE001 - reported by start() in the main thread
            self.error = exc
            self.ready.set()

    def start(self, timeout: float) -> None:
        self.thread.start()
        if not self.ready.wait(timeout):
            raise TimeoutError(f"the service did not start within {timeout:.0f} s")
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=90)


def _job(queue: JobQueue, study_uid: str) -> JobView | None:
    return next((j for j in queue.recent(limit=20) if j.study_instance_uid == study_uid), None)


def _wait_for_report(
    pacs: MockPacs, queue: JobQueue, truth: GroundTruth, deadline: float, echo: Echo
) -> tuple[Received | None, JobView | None]:
    """The SR of the phantom's study at the mock PACS, or None (deadline, or the job failed)."""
    start = time.monotonic()
    next_progress = start + PROGRESS_SECONDS
    uid = truth.study_instance_uid
    job: JobView | None = None
    while time.monotonic() < deadline:
        sr = pacs.wait_for(lambda r: r.modality == SR_MODALITY and r.study_instance_uid == uid, timeout=1.0)
        job = _job(queue, uid)
        if sr is not None:
            return sr, job
        if job is not None and job.state in (JobState.FAILED, JobState.DEAD, JobState.CANCELLED):
            echo(f"  job {job.id} {job.state.value}: {job.last_error}")
            return None, job
        if time.monotonic() >= next_progress:
            where = (
                "study not complete yet (quiet period)" if job is None else f"job {job.id} {job.state.value}"
            )
            echo(f"  ... {time.monotonic() - start:4.0f} s: {where}")
            next_progress += PROGRESS_SECONDS
    return None, job


def _match(report: SrReport, truth: GroundTruth) -> list[tuple[int, ReportedFinding | None]]:
    """Each true lesion's reported lesion: the nearest reported centroid, each used once (lesion order)."""
    left = [f for f in report.findings if f.centroid_lps is not None]
    pairs: list[tuple[int, ReportedFinding | None]] = []
    for index, lesion in enumerate(truth.lesions):
        best = min(
            left,
            key=lambda f: math.dist(f.centroid_lps or (math.inf,) * 3, lesion.centre_lps),
            default=None,
        )
        if best is not None and math.dist(best.centroid_lps or (math.inf,) * 3, lesion.centre_lps) > 2 * max(
            lesion.semi_axes_mm
        ):
            best = None  # nothing reported where this lesion is
        if best is not None:
            left.remove(best)
        pairs.append((index, best))
    return pairs


def judge(report: SrReport, truth: GroundTruth, sent: frozenset[str], tolerance: float) -> Verdict:
    """Compare the SR with the ground truth: each lesion's volume, priority, same study, every slice referenced."""
    from pipeline.demo.bundle import DEMO_THRESHOLDS

    true_ml = sum(lesion.volume_ml for lesion in truth.lesions)
    urgent = DEMO_THRESHOLDS.urgent_volume_ml or 0.0
    lines = [f"{'':<28}{'found (SR)':>14}{'ground truth':>18}"]
    ok = True
    matched: set[str] = set()
    for index, found in _match(report, truth):
        lesion = truth.lesions[index]
        label = f"lesion {lesion.label}"
        if found is None:
            ok = False
            lines.append(f"{label:<28}{'MISSED':>14}{lesion.volume_ml:>15.2f} mL")
            continue
        matched.add(found.tracking_uid or found.identifier)
        error = (found.volume_ml - lesion.volume_ml) / lesion.volume_ml
        good = abs(error) <= tolerance
        ok &= good
        diameter = "" if found.diameter_mm is None else f", diameter {found.diameter_mm:.3g} mm"
        lines.append(
            f"{label:<28}{found.volume_ml:>11.3g} mL{lesion.volume_ml:>15.3g} mL   "
            f"error {error:+.1%} ({'within' if good else 'OUTSIDE'} {tolerance:.0%}; SR {found.identifier}{diameter})"
        )
    for extra in report.findings:
        if (extra.tracking_uid or extra.identifier) not in matched:
            ok = False
            lines.append(
                f"{extra.identifier:<28}{extra.volume_ml:>11.3g} mL{'none':>18}   (NOT in the truth)"
            )
    if not truth.lesions:
        found_ml = report.total_volume_ml()
        good = found_ml < urgent
        ok &= good
        lines.append(
            f"{'total lesion volume':<28}{found_ml:>11.3g} mL{0.0:>15.3g} mL   "
            f"({'below' if good else 'NOT below'} the {urgent:g} mL urgent threshold)"
        )
    for c in report.classifications:
        lines.append(f"{'P(' + c.name + ')':<28}{c.probability:>14.2f}")
    priority = report.priority
    wanted_high = true_ml >= urgent
    good = priority is not None and ((priority > Priority.ROUTINE) == wanted_high)
    ok &= good
    expected = "URGENT or higher" if wanted_high else "ROUTINE"
    shown = "none" if priority is None else priority.name  # ROUTINE is 0: never test a Priority for truth
    lines.append(f"{'triage priority':<28}{shown:>14}{expected:>18}   ({'as expected' if good else 'WRONG'})")
    same_study = report.study_instance_uid == truth.study_instance_uid
    ok &= same_study
    lines.append(f"{'same study as the images':<28}{'yes' if same_study else 'NO':>14}{'yes':>18}")
    referenced = len(report.evidence & sent)
    ok &= referenced == len(sent)
    lines.append(f"{'source images referenced':<28}{referenced:>14}{len(sent):>18}")
    return Verdict(ok, tuple(lines))


def _arrival(pacs: MockPacs, sop_instance_uid: str) -> Received | None:
    return pacs.wait_for(lambda r: r.sop_instance_uid == sop_instance_uid, timeout=SEG_GRACE_SECONDS)


def _key_objects(pacs: MockPacs, study_uid: str) -> list[str]:
    """What arrived of the KOS and the key images it points at (each a delivery of its own)."""
    kos = pacs.wait_for(
        lambda r: r.modality == KOS_MODALITY and r.study_instance_uid == study_uid, timeout=SEG_GRACE_SECONDS
    )
    if kos is None:
        return ["KOS did not arrive"]
    wanted = [
        str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for item in kos.dataset.get("ContentSequence", [])
        if item.get("ValueType") == "IMAGE"
    ]
    images = [r for uid in wanted if (r := _arrival(pacs, uid)) is not None]
    lines = [f"KOS arrived: {kos.sop_instance_uid} (key images and the SR)"]
    lines.append(f"key images arrived: {len(images)} of {len(wanted)} (not for diagnostic use, outlined)")
    return lines


def run_demo(options: DemoOptions, echo: Echo = print) -> int:
    """Run the demo; returns the exit status (0: the SR arrived and matches)."""
    problem = check_bundles(options.bundle_dir)
    if problem is not None:
        echo(f"pacs-triage demo: {problem}")
        return EXIT_NO_BUNDLE
    setup_logging("INFO" if options.verbose else "WARNING")
    home = options.home or Path(tempfile.mkdtemp(prefix="pacs-triage-demo-"))
    home.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    pacs = MockPacs(directory=home / "mock-pacs").start()
    service: _Service | None = None
    try:
        port = _free_port()
        config = demo_config(home, port, pacs, options)
        echo(f"data directory   {home}{'' if options.home else ' (temporary)'}")
        echo(f"mock PACS        {pacs.peer} (pynetdicom C-STORE SCP)")
        echo(f"pacs-triage      {config.ae_title}@127.0.0.1:{port}, routing CT to the demo pipeline, "
             f"quiet period {options.quiet_seconds:g} s")  # fmt: skip
        service = _Service(config)
        service.start(timeout=60)
        engine = make_engine(config.effective_database_url, pool_size=1)
        sessions = make_session_factory(engine)
        queue, outbox = JobQueue(sessions), Outbox(sessions)
        try:
            return _scenario(options, home, pacs, config, queue, outbox, echo, started)
        finally:
            engine.dispose()
    finally:
        if service is not None:
            service.stop()
        pacs.stop()
        if options.home is None:
            shutil.rmtree(home, ignore_errors=True)


def _scenario(
    options: DemoOptions,
    home: Path,
    pacs: MockPacs,
    config: Config,
    queue: JobQueue,
    outbox: Outbox,
    echo: Echo,
    started: float,
) -> int:
    t = time.monotonic()
    series_dir = home / "phantom"
    truth = write_phantom_series(
        series_dir, seed=options.seed, lesions=options.lesions, slices=options.slices
    )
    files = sorted(series_dir.glob("*.dcm"))
    volumes = ", ".join(f"{lesion.volume_ml:.1f} mL" for lesion in truth.lesions) or "none"
    echo(f"phantom          seed {options.seed}: {len(files)} CT slices, lesions: {volumes} "
         f"({time.monotonic() - t:.1f} s)")  # fmt: skip

    send_start = time.time()
    results = list(send_files(Peer(config.ae_title, "127.0.0.1", config.port), files, calling_ae=CALLING_AE))
    last_ack = time.time()
    failed = [r for r in results if not r.ok]
    if failed:
        echo(f"sending failed for {len(failed)} of {len(files)} files, e.g. {failed[0].comment}")
        return EXIT_MISMATCH
    echo(f"sent             {len(files)} instances with C-STORE in {last_ack - send_start:.1f} s; "
         f"waiting for the SR at the mock PACS (up to {options.timeout_seconds:.0f} s)")  # fmt: skip

    deadline = time.monotonic() + options.timeout_seconds
    sr, job = _wait_for_report(pacs, queue, truth, deadline, echo)
    if sr is None:
        if job is None or job.state not in (JobState.FAILED, JobState.DEAD):
            echo(f"no SR arrived within {options.timeout_seconds:.0f} s")
        echo("see `pacs-triage status` / `jobs show` with --home to investigate (run with --home DIR)")
        return EXIT_MISMATCH
    seg = pacs.wait_for(
        lambda r: r.modality == SEG_MODALITY and r.study_instance_uid == truth.study_instance_uid,
        timeout=SEG_GRACE_SECONDS,
    )
    report = read_sr(sr.dataset)
    sent = frozenset(r.sop_instance_uid for r in results)
    verdict = judge(report, truth, sent, options.tolerance)
    echo("")
    echo(f"SR arrived at the mock PACS: {sr.sop_instance_uid} (series {report.series_instance_uid})")
    echo(f"SEG {'arrived: ' + seg.sop_instance_uid if seg else 'did not arrive'}")
    for line in _key_objects(pacs, truth.study_instance_uid):
        echo(line)
    echo(f"summary: {report.summary}")
    echo("")
    for line in verdict.lines:
        echo(line)

    job = job or _job(queue, truth.study_instance_uid)
    if job is not None:
        echo("")
        echo("where the time went (s)")
        rows = [
            (f"send the study (C-STORE, {len(files)} instances)", last_ack - send_start),
            *breakdown(job_timeline(queue, outbox, job), last_ack=last_ack, report_received=sr.received_at),
            ("last instance acknowledged -> SR at the PACS", sr.received_at - last_ack),
        ]
        width = max(len(label) for label, _ in rows) + 2
        for label, seconds in rows:
            echo(f"  {label:<{width}}{seconds:>7.1f}")
    echo(f"demo took {time.monotonic() - started:.0f} s in all")
    echo("")
    echo(
        "RESULT: " + ("the SR arrived and matches the ground truth" if verdict.ok else "MISMATCH (see above)")
    )
    return EXIT_OK if verdict.ok else EXIT_MISMATCH
