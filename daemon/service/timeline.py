"""Where the time of one study went, from the audit trail: the demo's and the benchmark's breakdown.

The database records when a job was queued (completion), claimed (``running``) and finished
(``succeeded``, with the pipeline's seconds per stage), and when each result was delivered. The
caller adds what only it saw: when the last instance was acknowledged, and when the report arrived
at the PACS. All times are wall-clock seconds since the epoch on this host.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field

from storage.outbox import Outbox
from storage.queue import JobQueue, JobView

LOAD_MODELS = "load models (first job of a worker)"
WORKER_OVERHEAD = "worker overhead (first job: imports; results to spool + database)"

#: The runner's stages (pipeline.runner.STAGES) grouped as the timeline reports them.
PIPELINE_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("load (select series, decode, headers)", ("select", "load", "headers")),
    (LOAD_MODELS, ("bundles",)),
    ("inference (segmentation, classification)", ("inference",)),
    ("measure findings", ("measure",)),
    ("write SR/SEG", ("write",)),
)


@dataclass(frozen=True)
class JobTimeline:
    """One job's recorded times (epoch seconds) and the pipeline's stage seconds."""

    job: JobView
    queued_at: float
    claimed_at: float | None
    finished_at: float | None
    stages: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: float | None = None  # the worker's peak resident memory during the run
    delivered_at: dict[str, float] = field(default_factory=dict)  # SOP Instance UID -> time


def job_timeline(queue: JobQueue, outbox: Outbox, job: JobView) -> JobTimeline:
    """Read a job's timeline from its audit rows and deliveries (the latest attempt's claim)."""
    claimed = finished = None
    stages: dict[str, float] = {}
    peak_rss: float | None = None
    for event in queue.history(job.id):
        if event.kind == "running":
            claimed = event.at.timestamp()
        elif event.kind == "succeeded":
            finished = event.at.timestamp()
            detail = json.loads(event.detail) if event.detail else {}
            stages = {str(k): float(v) for k, v in detail.get("stages", {}).items()}
            peak_rss = float(detail["peak_rss_mib"]) if "peak_rss_mib" in detail else None
    delivered = {
        d.sop_instance_uid: d.delivered_at.timestamp()
        for d in outbox.for_job(job.id)
        if d.delivered_at is not None
    }
    return JobTimeline(
        job=job,
        queued_at=job.created_at.timestamp(),
        claimed_at=claimed,
        finished_at=finished,
        stages=stages,
        peak_rss_mib=peak_rss,
        delivered_at=delivered,
    )


def breakdown(timeline: JobTimeline, *, last_ack: float, report_received: float) -> list[tuple[str, float]]:
    """(stage, seconds) from the last instance acknowledged to the report received at the PACS.

    The rows add up to the total: what the pipeline did not account for between claim and
    success is the worker's own overhead (on a worker's first job the import of torch and MONAI;
    always: encoding the results into the spool, one transaction).
    """
    claimed = timeline.claimed_at if timeline.claimed_at is not None else timeline.queued_at
    finished = timeline.finished_at if timeline.finished_at is not None else claimed
    rows = [
        ("completion wait (association release + quiet period + sweep)", timeline.queued_at - last_ack),
        ("queue wait (until a worker claimed the job)", claimed - timeline.queued_at),
    ]
    accounted = 0.0
    for label, keys in PIPELINE_GROUPS:
        seconds = sum(timeline.stages.get(k, 0.0) for k in keys)
        accounted += seconds
        rows.append((label, seconds))
    rows.append((WORKER_OVERHEAD, (finished - claimed) - accounted))
    rows.append(("sending (dispatcher C-STORE to the PACS)", report_received - finished))
    return rows


def study_stages(
    queue: JobQueue, outbox: Outbox, job: JobView, *, last_received: dt.datetime
) -> list[tuple[str, float]]:
    """Where the time of a succeeded job went, from its study's last instance received to the last
    delivery of its results (or to its success when nothing was sent): the API's and pages' breakdown."""
    timeline = job_timeline(queue, outbox, job)
    end = max(timeline.delivered_at.values(), default=timeline.finished_at or timeline.queued_at)
    return breakdown(timeline, last_ack=last_received.timestamp(), report_received=end)
