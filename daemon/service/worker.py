"""Workers: claim a job under a lease, run its pipeline on the study's files, record the results.

A worker is a process: ``serve --workers N`` starts N of them (:class:`WorkerPool`), and
``pacs-triage worker`` runs one on its own, e.g. on a GPU host sharing PostgreSQL and the spool.

* The pipeline runs in a thread while this one heartbeats the lease.
* The worker checks that the study still holds exactly the input the job was queued for;
  if late instances changed it, it gives the job back (a superseding job follows).
* Results are written to the spool first, then recorded with their outbox rows and the job's
  success in one transaction (``storage/queue.py``); a worker that lost its lease records nothing.
* SIGTERM/SIGINT: finish the current job within ``workers.shutdown_grace_seconds``, else give the
  lease back, then exit.
* Errors: ``pipeline.errors.PermanentError`` fails the job without retry; anything else is
  transient and retried with backoff until ``workers.max_attempts``, then the job is dead.
"""

from __future__ import annotations

import contextvars
import io
import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Config
from daemon.delivery.contents import plan
from daemon.logs import bound_ids, ref, setup_logging
from daemon.pipelines.registry import AnalysisOutcome, Pipelines
from daemon.polling import run_until_stopped
from daemon.service.job_errors import classify
from daemon.service.liveness import Beacon, beat_interval
from daemon.service.memory import PeakRss, start_peak_rss
from daemon.service.supervisor import ChildSpec, Readiness, Supervisor
from pipeline.errors import PermanentError
from pipeline.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from pipeline.writers.sr import SR_STORAGE_ROOT, PreviousReport, is_report, with_predecessors
from storage.completion import input_fingerprint, study_input
from storage.db import make_engine, make_session_factory
from storage.errors import SpoolUnavailable, StorageError, StorageUnavailable
from storage.heartbeats import Component
from storage.leases import worker_name
from storage.migrate import current_revision, head_revision
from storage.outbox import Destination
from storage.queue import Claim, JobQueue, NewResult
from storage.spool import Spool
from storage.superseded import delivered_results

log = logging.getLogger(__name__)

# A result (SR, SEG: 1 bit per voxel) is far smaller than its input: the results disk must have
# room for one byte per this many bytes of input before the model runs.
INPUT_BYTES_PER_RESULT_BYTE = 8


@dataclass
class _Run:
    """One pipeline run in its thread: the outcome, once ``done`` is set."""

    done: threading.Event
    result: AnalysisOutcome | None = None
    error: BaseException | None = None
    peak_rss: PeakRss | None = None  # the process's peak resident memory during the run


class Worker:
    """Runs jobs one at a time until told to stop."""

    def __init__(
        self,
        config: Config,
        sessions: sessionmaker[Session],
        spool: Spool,
        results: Spool,
        *,
        name: str | None = None,
        pipelines: Pipelines | None = None,
    ) -> None:
        self.config = config
        self.sessions = sessions
        self.spool = spool  # received instances (read)
        self.results = results  # result objects (written)
        self.name = name or worker_name("worker")
        self.pipelines = pipelines or Pipelines(config)
        self.queue = JobQueue(
            sessions, lease_seconds=config.workers.lease_seconds, backoff=config.workers.backoff.policy()
        )
        self.stop = threading.Event()
        # for /readyz and the dashboard
        self.beacon = Beacon(sessions, Component.WORKER, self.name, interval=beat_interval(config))

    def run(self) -> None:
        """Claim and run jobs until :attr:`stop` is set."""
        log.info("worker %s started", self.name)
        run_until_stopped(
            self.stop, self.run_one, idle_seconds=self.config.workers.poll_seconds, who=f"worker {self.name}"
        )
        self.beacon.forget()
        log.info("worker %s stopped", self.name)

    def run_one(self) -> bool:
        """Claim one due job and run it; False when none was due."""
        self.beacon.beat()
        claim = self.queue.claim(self.name)
        if claim is None:
            return False
        job = claim.job
        with bound_ids(job_id=job.id, study_id=job.study_id):
            log.info(
                "job %d (%s, study %s, attempt %d/%d) started",
                job.id,
                job.pipeline,
                ref(job.study_instance_uid),
                job.attempts,
                job.max_attempts,
            )
            try:
                self._execute(claim)
            except StorageError as exc:
                # The outcome could not be recorded: the lease runs out and the reaper requeues the job.
                log.warning(
                    "job %d: could not record its outcome (%s); it will be retried after its lease expires",
                    job.id,
                    exc,
                )
        return True

    def _execute(self, claim: Claim) -> None:
        job = claim.job
        inputs = study_input(self.sessions, job.study_id)
        if input_fingerprint(job.pipeline, inputs.content_digest) != job.input_fingerprint:
            self.queue.release(
                claim,
                reason="the study changed since the job was queued; a superseding job follows",
                delay_seconds=self.config.completion.quiet_seconds,
            )
            log.info(
                "job %d: study %s changed since it was queued; given back",
                job.id,
                ref(job.study_instance_uid),
            )
            return
        try:
            pipeline = self.pipelines.get(job.pipeline)
            files = self._readable_inputs(job.study_instance_uid, inputs.paths)
        except (PermanentError, StorageError) as exc:
            self._fail(claim, exc)
            return
        run = _Run(threading.Event())

        def target() -> None:
            meter = start_peak_rss()  # one job at a time per worker process: its peak is this run's
            try:
                run.result = pipeline.run(files, input_fingerprint=job.input_fingerprint)
            except BaseException as exc:  # noqa: BLE001 - handed to the worker boundary below
                run.error = exc
            finally:
                run.peak_rss = meter.peak()
                run.done.set()

        # The pipeline's own log lines carry the job's ids too (the context is copied).
        threading.Thread(
            target=contextvars.copy_context().run, args=(target,), name=f"job-{job.id}", daemon=True
        ).start()
        if not self._supervise(claim, run):
            return
        if run.error is not None:
            self._fail(claim, run.error)
            return
        assert run.result is not None
        try:
            self._succeed(claim, run.result, run.peak_rss)
        except SpoolUnavailable as exc:
            self._fail(claim, exc)
        except StorageError:
            raise  # not recorded: the lease runs out and the reaper requeues the job
        except Exception as exc:  # noqa: BLE001 - a result that cannot be encoded: classified like the run
            self._fail(claim, exc)

    def _readable_inputs(self, study_uid: str, paths: Sequence[str]) -> list[Path]:
        """The study's files, each readable here, and room for the results, checked before the model
        runs: a worker on a host without the spool, or with a full results disk, fails transiently,
        naming the file or the disk, instead of feeding a pipeline half a study.
        """
        files = [self.spool.path_of(p) for p in paths]
        total = 0
        for relative, path in zip(paths, files, strict=True):
            try:
                total += path.stat().st_size
                readable = os.access(path, os.R_OK)
            except OSError:
                readable = False
            if not readable:
                raise SpoolUnavailable(
                    f"spool file {relative} of study {study_uid} is missing or unreadable on this host "
                    f"({self.name}, spool {self.spool.root}); run the worker where the spool is mounted"
                )
        try:
            self.results.check_space(incoming=total // INPUT_BYTES_PER_RESULT_BYTE)
        except SpoolUnavailable as exc:
            raise SpoolUnavailable(f"results disk full, the model was not run: {exc}") from exc
        return files

    def _supervise(self, claim: Claim, run: _Run) -> bool:
        """Heartbeat until the run is done; False if the lease was given back on shutdown."""
        deadline: float | None = None
        lost = False
        while not run.done.wait(self.config.workers.heartbeat_interval):
            self.beacon.beat(busy=True, force=True)
            if not lost:
                try:
                    lost = not self.queue.heartbeat(claim)
                except StorageUnavailable as exc:
                    log.warning("job %d: heartbeat failed: %s", claim.job.id, exc)
                if lost:
                    log.warning(
                        "job %d: lease lost (cancelled, superseded or expired); its result will be dropped",
                        claim.job.id,
                    )
            if self.stop.is_set() and not lost:
                if deadline is None:
                    deadline = time.monotonic() + self.config.workers.shutdown_grace_seconds
                if time.monotonic() >= deadline:
                    self.queue.release(claim, reason="worker shut down before the job finished")
                    log.warning(
                        "job %d: given back at shutdown (did not finish within %.0f s)",
                        claim.job.id,
                        self.config.workers.shutdown_grace_seconds,
                    )
                    return False
        return True

    def _fail(self, claim: Claim, error: BaseException) -> None:
        # The one broad catch of the worker is around the pipeline (in _execute's thread); here the
        # error is classified (daemon/service/job_errors.py) and recorded: one line, then the traceback.
        failure = classify(error, pipeline=claim.job.pipeline)
        state = self.queue.fail(claim, failure.detail, permanent=failure.permanent)
        kind = "permanently" if failure.permanent else "transiently"
        if state is None:
            log.warning(
                "job %d failed %s (%s) but its lease was lost meanwhile", claim.job.id, kind, failure.reason
            )
        else:
            log.warning("job %d failed %s (%s): now %s", claim.job.id, kind, failure.reason, state.value)

    def _succeed(self, claim: Claim, result: AnalysisOutcome, peak_rss: PeakRss | None = None) -> None:
        job = claim.job
        # Late instances after a delivered report: the new SR names the one(s) it replaces.
        previous = [
            PreviousReport(
                study_instance_uid=r.study_instance_uid,
                series_instance_uid=r.series_instance_uid,
                sop_class_uid=r.sop_class_uid,
                sop_instance_uid=r.sop_instance_uid,
            )
            for r in delivered_results(self.sessions, job.study_id, besides_job=job.id)
            if r.sop_class_uid.startswith(SR_STORAGE_ROOT)
        ]
        datasets = [with_predecessors(ds, previous) if is_report(ds) else ds for ds in result.datasets]
        records = [self._write(ds, int(result.priority), result.summary) for ds in datasets]
        destinations = [  # one outbox row kind per destination x what it receives from this rule
            Destination(name=d.name, peer=d.peer, content=content, sop_classes=classes)
            for d, contents in self.config.deliveries_for(job.rule)
            for content, classes in plan(d, contents)
        ]
        if self.queue.succeed(
            claim,
            records,
            destinations,
            delivery_max_attempts=self.config.dispatch.max_attempts,
            stage_seconds=result.stage_seconds,
            peak_rss_bytes=None if peak_rss is None else peak_rss.bytes,
        ):
            log.info(
                "job %d succeeded: %d result(s), %d destination(s), priority %s, peak memory %s",
                job.id,
                len(records),
                len(destinations),
                result.priority.name,
                "unknown" if peak_rss is None else f"{peak_rss.mib:.0f} MiB",
            )
        else:
            log.warning("job %d finished but its lease was lost meanwhile; result dropped", job.id)

    def _write(self, ds: Dataset, priority: int, summary: str) -> NewResult:
        """Encode a result as a Part 10 file into the results spool (before it is recorded)."""
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        ds.file_meta = meta
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        uid = str(ds.SOPInstanceUID)
        pending = self.results.write_pending((buffer.getvalue(),))
        stored = self.results.commit(pending, uid)
        return NewResult(
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=uid,
            series_instance_uid=str(ds.SeriesInstanceUID),
            path=stored.relative_path,
            size_bytes=stored.size_bytes,
            sha256=stored.sha256,
            priority=priority,
            summary=summary,
        )


# -- processes ----------------------------------------------------------------------------------


class SchemaNotReady(Exception):
    """The database schema is not at the revision this code needs."""


def check_spool_readable(spool: Spool) -> None:
    """At start: the received instances must be readable here (a worker on another host needs the
    spool on shared storage), else :class:`SpoolUnavailable` naming the directory."""
    if not (spool.objects.is_dir() and os.access(spool.objects, os.R_OK | os.X_OK)):
        raise SpoolUnavailable(
            f"cannot read the spool of received instances at {spool.objects}: mount the storage that "
            "`pacs-triage serve` writes to at this path (or set PACS_TRIAGE_HOME / storage paths), "
            "then start the worker again"
        )


def run_process(config: Config, *, standalone: bool, readiness: Readiness | None = None) -> None:
    """Body of one worker process: until SIGTERM/SIGINT (under ``serve``, also sent when serve dies)."""
    setup_logging(config.logging)
    engine = make_engine(config.effective_database_url, pool_size=2)
    try:
        if standalone:
            have, want = current_revision(engine), head_revision(engine)
            if have != want:
                raise SchemaNotReady(
                    f"database schema is at {have}, this worker needs {want}: run `pacs-triage db upgrade` "
                    f"(or start `pacs-triage serve`) first"
                )
        spool = Spool(config.spool_dir, min_free_bytes=config.storage.min_free_bytes)
        check_spool_readable(spool)
        results = Spool(config.results_dir, min_free_bytes=config.storage.min_free_bytes)
        results.open()
        worker = Worker(config, make_session_factory(engine), spool, results)

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info(
                "worker %s: %s received; finishing the current job", worker.name, signal.Signals(signum).name
            )
            worker.stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        # Models and imports now, not on the first job (issue 15: cold start); ready once loaded.
        worker.pipelines.warm(rule.pipeline for rule in config.routing.rules)
        if readiness is not None:
            readiness.ready()
        worker.run()
    except Exception as exc:
        if readiness is not None:
            readiness.failed(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        engine.dispose()


def _pool_child(_index: int, readiness: Readiness, config: Config) -> None:
    run_process(config, standalone=False, readiness=readiness)


class WorkerPool:
    """The worker processes of ``serve``: started, restarted (with backoff) when one dies, stopped.

    A worker gets SIGTERM when serve dies (``kill -9`` included): it finishes its job within
    ``workers.shutdown_grace_seconds`` or gives the lease back. A worker that was killed leaves its
    job to the lease reaper.
    """

    def __init__(self, config: Config, count: int) -> None:
        self.config = config
        self.supervisor = Supervisor(
            ChildSpec(
                kind="worker",
                target=_pool_child,
                args=(config,),
                death_signal=signal.SIGTERM,
                stop_grace_seconds=config.workers.shutdown_grace_seconds + 10,
            ),
            count,
        )

    def start(self) -> None:
        # Not waiting: a worker imports the ML stack (seconds); the receiver need not wait for it.
        self.supervisor.start(wait=False)

    def check(self) -> None:
        """Restart workers that died (killed, crashed); their jobs come back when the leases expire."""
        self.supervisor.check()

    def pids(self) -> list[int]:
        return self.supervisor.pids()

    def stop(self) -> None:
        """SIGTERM: each worker finishes its job or gives it back; stragglers are killed."""
        self.supervisor.stop()
