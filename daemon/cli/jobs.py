"""Operator commands for the queue: ``jobs``, ``deliveries``, ``studies complete``, ``worker``, and the
queue part of ``status``. Registered into the ``pacs-triage`` app by ``daemon/cli/main.py``.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from daemon.cli.common import ConfigOption, fail, load

if TYPE_CHECKING:
    from daemon.cli.database import Database
    from storage.outbox import DeliveryView, Outbox
    from storage.queue import JobQueue, JobView
    from storage.stats import QueueSummary

jobs_app = typer.Typer(help="Analysis jobs: list, show, retry, cancel.", no_args_is_help=True)
deliveries_app = typer.Typer(
    help="Results being sent to destinations: list, retry, send-now.", no_args_is_help=True
)
studies_app = typer.Typer(help="Received studies: list (the worklist), show, complete.", no_args_is_help=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
Limit = Annotated[int, typer.Option(min=1, help="Show at most this many, newest first.")]


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""
    app.add_typer(jobs_app, name="jobs")
    app.add_typer(deliveries_app, name="deliveries")
    app.add_typer(studies_app, name="studies")
    app.command("worker")(worker)


@contextmanager
def _node(config_path: Path | None) -> Iterator[Database]:
    """The node's database as it is (never migrated or created here), storage errors a clean exit."""
    from daemon.cli.database import existing_node
    from storage.errors import InvalidTransition, NotFound, StorageUnavailable

    config = load(config_path)
    with existing_node(config) as node:
        try:
            yield node
        except (StorageUnavailable, NotFound, InvalidTransition) as exc:
            fail(str(exc))


def _queues(node: Database) -> tuple[JobQueue, Outbox]:
    from storage.outbox import Outbox
    from storage.queue import JobQueue

    return JobQueue(node.sessions), Outbox(node.sessions)


def _actor() -> str:
    """Who is acting, for the audit row of an operator action: ``cli:<user>``."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no passwd entry (some containers)
        return "cli"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _when(value: dt.datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _json(items: Any) -> None:
    typer.echo(json.dumps(items, indent=2, sort_keys=True, default=str))


def _job_line(job: JobView) -> str:
    return (
        f"{job.id:>6}  {job.state.value:<10} {job.priority.name.lower():<7} {job.pipeline:<10} "
        f"{job.attempts}/{job.max_attempts}  {_when(job.created_at)}  {job.study_instance_uid}"
    )


def _delivery_line(d: DeliveryView) -> str:
    from daemon.delivery.contents import status_text

    status = status_text(d.content, d.last_status)
    what = f" {d.content}" if d.content else ""
    return (
        f"{d.id:>6}  {d.state.value:<10} job {d.job_id:<6} {d.attempts}/{d.max_attempts}  {status:<8} "
        f"{d.destination} ({d.peer}){what}  {d.sop_instance_uid}"
    )


def _states(values: Sequence[str] | None, enum_type: Any) -> list[Any]:
    try:
        return [enum_type(v.lower()) for v in values or ()]
    except ValueError:
        fail(
            f"unknown state in {list(values or ())}; use one of: {', '.join(s.value for s in enum_type)}",
            code=2,
        )


@jobs_app.command("list")
def jobs_list(
    config_path: ConfigOption = None,
    state: Annotated[list[str] | None, typer.Option(help="Only jobs in this state (repeatable).")] = None,
    limit: Limit = 50,
    as_json: JsonFlag = False,
) -> None:
    """List jobs, newest first."""
    from storage.models import JobState

    with _node(config_path) as node:
        jobs = _queues(node)[0].recent(_states(state, JobState), limit)
    if as_json:
        _json([asdict(j) for j in jobs])
        return
    typer.echo(f"{'id':>6}  {'state':<10} {'prio':<7} {'pipeline':<10} try  {'created (UTC)':<19}  study")
    for job in jobs:
        typer.echo(_job_line(job))


@jobs_app.command("show")
def jobs_show(job_id: int, config_path: ConfigOption = None, as_json: JsonFlag = False) -> None:
    """A job with its history (stage timings included), results with their findings, and deliveries."""
    from storage.reports import job_results

    with _node(config_path) as node:
        queue, outbox = _queues(node)
        job = queue.get(job_id)
        history = queue.history(job_id)
        results = job_results(node.sessions, job_id)
        deliveries = outbox.for_job(job_id)
    if as_json:
        _json(
            {
                "job": asdict(job),
                "history": [asdict(e) for e in history],
                "results": [asdict(r) for r in results],
                "deliveries": [asdict(d) for d in deliveries],
            }
        )
        return
    for key, value in asdict(job).items():
        typer.echo(f"{key:<18} {value.name.lower() if key == 'priority' else value}")
    typer.echo("history:")
    for event in history:
        typer.echo(f"  {_when(event.at)}  {event.kind:<11} {event.detail}")
    typer.echo("results:" if results else "results: none")
    for r in results:
        typer.echo(f"  {r.id:>6}  priority {r.priority.name:<7} {r.sop_instance_uid}")
        for finding in (line for line in r.summary.splitlines() if line.strip()):
            typer.echo(f"      - {finding}")
    typer.echo("deliveries:" if deliveries else "deliveries: none")
    for d in deliveries:
        typer.echo("  " + _delivery_line(d) + (f"\n      last error: {d.last_error}" if d.last_error else ""))


@jobs_app.command("retry")
def jobs_retry(
    job_id: Annotated[int | None, typer.Argument(help="The job to queue again.")] = None,
    config_path: ConfigOption = None,
    all_dead: Annotated[
        bool, typer.Option("--all-dead", help="Queue every dead job AND every dead delivery again.")
    ] = False,
) -> None:
    """Queue a failed, dead or cancelled job again, with a fresh set of attempts (audited as "cli").

    With --all-dead, every dead job and every dead delivery at once (one transaction), as the
    failures page's bulk retry does.
    """
    from storage import operations
    from storage.models import utcnow

    if (job_id is None) == (not all_dead):
        fail("give a job id or --all-dead (not both)", code=2)
    with _node(config_path) as node:
        if all_dead:
            bulk = operations.retry_all_dead(node.sessions, by="cli", now=utcnow())
            typer.echo(
                f"queued again: {len(bulk.jobs)} dead job(s){' ' + str(bulk.jobs) if bulk.jobs else ''}, "
                f"{len(bulk.deliveries)} dead deliveries{' ' + str(bulk.deliveries) if bulk.deliveries else ''}"
            )
            return
        assert job_id is not None
        outcome = operations.retry_job(node.sessions, job_id, by="cli", now=utcnow())
    job = outcome.job
    word = "queued again" if outcome.changed else f"already {job.state.value}; nothing to do"
    typer.echo(f"job {job.id} {word} (study {job.study_instance_uid})")


@jobs_app.command("cancel")
def jobs_cancel(job_id: int, config_path: ConfigOption = None) -> None:
    """Cancel a job that has not succeeded (a running one's result is dropped)."""
    from storage.operations import cancel_job

    with _node(config_path) as node:
        done = cancel_job(node.sessions, job_id, by=_actor(), now=_now())
    what = "cancelled" if done.changed else "was already cancelled"
    typer.echo(f"job {done.job.id} {what} (study {done.job.study_instance_uid})")


@deliveries_app.command("list")
def deliveries_list(
    config_path: ConfigOption = None,
    state: Annotated[
        list[str] | None, typer.Option(help="Only deliveries in this state (repeatable).")
    ] = None,
    limit: Limit = 50,
    as_json: JsonFlag = False,
) -> None:
    """List deliveries (result x destination x what is sent: sr, hl7_oru, fhir...), newest first."""
    from storage.models import DeliveryState

    with _node(config_path) as node:
        rows = _queues(node)[1].recent(_states(state, DeliveryState), limit)
    if as_json:
        _json([asdict(d) for d in rows])
        return
    for d in rows:
        typer.echo(_delivery_line(d))


@deliveries_app.command("retry")
def deliveries_retry(delivery_id: int, config_path: ConfigOption = None) -> None:
    """Send a dead or cancelled delivery again, with a fresh set of attempts."""
    from storage.operations import retry_delivery

    with _node(config_path) as node:
        done = retry_delivery(node.sessions, delivery_id, by=_actor(), now=_now())
    d = done.delivery
    what = "queued again" if done.changed else f"already {d.state.value}"
    typer.echo(f"delivery {d.id} of {d.sop_instance_uid} to {d.destination} {what}")


@deliveries_app.command("send-now")
def deliveries_send_now(delivery_id: int, config_path: ConfigOption = None) -> None:
    """Send without waiting for the backoff: a pending delivery becomes due now, a dead or cancelled one
    pending again with fresh attempts. A running dispatcher sends it within its poll interval."""
    from storage import operations
    from storage.models import utcnow

    with _node(config_path) as node:
        outcome = operations.send_now(node.sessions, delivery_id, by="cli", now=utcnow())
    d = outcome.delivery
    word = "due now" if outcome.changed else f"{d.state.value}; nothing to do"
    typer.echo(f"delivery {d.id} of {d.sop_instance_uid} to {d.destination}: {word}")


@studies_app.command("complete")
def studies_complete(
    study_instance_uid: Annotated[str, typer.Argument(help="Study Instance UID.")],
    config_path: ConfigOption = None,
) -> None:
    """Complete a study now (route it and queue its job) without waiting for the quiet period."""
    from daemon.service.routing import CompletionSweep
    from storage.spool import Spool

    with _node(config_path) as node:
        config = node.config
        outcome = CompletionSweep(config, node.sessions, Spool(config.spool_dir)).force(study_instance_uid)
    if outcome.state is None:
        fail(f"study {study_instance_uid} not completed: {outcome.note}")
    job = f", job {outcome.job_id} queued" if outcome.job_id is not None else ""
    typer.echo(
        f"study {study_instance_uid}: {outcome.state.value}{job}{' (' + outcome.note + ')' if outcome.note else ''}"
    )


def worker(config_path: ConfigOption = None) -> None:
    """Run one worker until SIGTERM/SIGINT (e.g. on a GPU host sharing PostgreSQL and the spool)."""
    from daemon.cli.database import unreachable
    from daemon.config import ConfigError
    from daemon.pipelines.registry import check_routing
    from daemon.service.worker import SchemaNotReady, run_process
    from storage.errors import StorageUnavailable

    config = load(config_path)
    try:
        check_routing(config)
        run_process(config, standalone=True)
    except ConfigError as exc:
        fail(str(exc), code=2)
    except SchemaNotReady as exc:
        fail(str(exc))
    except StorageUnavailable as exc:
        fail(unreachable(config, exc), code=2)


def echo_queue(q: QueueSummary) -> None:
    """The queue part of ``pacs-triage status``."""
    for state, by_priority in q.jobs_by_state.items():
        if by_priority:
            detail = ", ".join(f"{p} {n}" for p, n in sorted(by_priority.items()))
            typer.echo(f"  {state:<11} {sum(by_priority.values()):>6}  ({detail})")
    typer.echo(f"oldest waiting job  {_age(q.oldest_queued_seconds)}")
    typer.echo("deliveries " + ", ".join(f"{k} {v}" for k, v in q.deliveries_by_state.items()))
    if q.resent_deliveries_total:
        typer.echo(
            f"re-sent deliveries: {q.resent_deliveries_total} (a dispatcher died mid-send; the PACS got a "
            "duplicate with the same UIDs)"
        )
    for title, total, problems in (
        ("dead jobs", q.dead_jobs_total, q.dead_jobs),
        ("failed jobs (permanent: see `jobs show ID`)", q.failed_jobs_total, q.failed_jobs),
        ("dead deliveries", q.dead_deliveries_total, q.dead_deliveries),
        ("not routed studies", q.not_routed_total, q.not_routed),
        (
            "instances refused, identity conflict (never merged)",
            q.identity_conflicts_total,
            q.identity_conflicts,
        ),
    ):
        if total:
            typer.echo(f"{title}: {total}")
            for p in problems:
                first_line = p.detail.splitlines()[0] if p.detail else ""
                typer.echo(f"  {p.id:>6}  {p.study_instance_uid}  {first_line[:500]}")
