"""``pacs-triage studies list`` and ``studies show``: the worklist and one study, with its triage result.

They read through ``storage/studies.py``, the same functions as ``/api/v1/studies`` and the pages.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Annotated, Any

import typer

from daemon.cli.common import ConfigOption, fail, load

if TYPE_CHECKING:
    from storage.studies import StudyDetail, StudySummary

JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


def _when(value: Any) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} s"


def _summary_dict(s: StudySummary) -> dict[str, Any]:
    return {**asdict(s), "time_to_result_seconds": s.time_to_result_seconds}


def _line(s: StudySummary) -> str:
    priority = s.priority.name.lower() if s.priority is not None else "-"
    job = f"{s.job_id} {s.job_state.value}" if s.job_id is not None and s.job_state is not None else "-"
    return (
        f"{s.id:>6}  {priority:<7} {s.state.value:<10} {job:<16} {s.instance_count:>5}  "
        f"{_when(s.last_received_at)}  {_seconds(s.time_to_result_seconds):>6}  "
        f"{(s.main_finding or '')[:60]}"
    )


def studies_list(
    config_path: ConfigOption = None,
    state: Annotated[
        list[str] | None,
        typer.Option(
            help="Only studies in this state (repeatable): receiving, complete, not_routed, purged."
        ),
    ] = None,
    priority: Annotated[
        list[str] | None, typer.Option(help="Only this triage priority (repeatable): routine, urgent, stat.")
    ] = None,
    pipeline: Annotated[
        str | None, typer.Option(help="Only studies whose current job ran this pipeline.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=10000, help="Show at most this many.")] = 50,
    as_json: JsonFlag = False,
) -> None:
    """The worklist: studies by triage priority (STAT first; no result yet last), then newest first.

    Columns: row id (for `studies show`), priority, state, current job and its state, instances,
    last received (UTC), time to result (last instance received -> result delivered), main finding.
    """
    from daemon.cli.database import existing_node
    from storage.models import StudyState
    from storage.studies import StudyFilter, worklist
    from vocabulary import Priority

    try:
        states = tuple(StudyState(s.lower()) for s in state or ())
        priorities = tuple(Priority.from_name(p) for p in priority or ())
    except (ValueError, KeyError) as exc:
        fail(f"{exc}; states: {', '.join(s.value for s in StudyState)}; priorities: routine, urgent, stat", 2)
    config = load(config_path)
    with existing_node(config) as node:
        rows = worklist(
            node.sessions, StudyFilter(states=states, priorities=priorities, pipeline=pipeline, limit=limit)
        )
    if as_json:
        _json([_summary_dict(s) for s in rows])
        return
    typer.echo(
        f"{'id':>6}  {'prio':<7} {'state':<10} {'job':<16} {'inst':>5}  {'last received (UTC)':<19}  "
        f"{'to res':>6}  main finding"
    )
    for s in rows:
        typer.echo(_line(s))


def studies_show(
    study: Annotated[
        str, typer.Argument(help="The study's row id (from `studies list`) or its Study Instance UID.")
    ],
    config_path: ConfigOption = None,
    as_json: JsonFlag = False,
) -> None:
    """One study: its triage result and findings, series, jobs, deliveries and the timeline of every stage."""
    from sqlalchemy import select

    from daemon.cli.database import existing_node
    from storage.errors import NotFound, StorageUnavailable
    from storage.models import Study
    from storage.studies import study_detail

    config = load(config_path)
    with existing_node(config) as node:
        try:
            if study.isdigit():
                study_id = int(study)
            else:
                with node.sessions() as session:
                    found = session.scalar(select(Study.id).where(Study.study_instance_uid == study))
                if found is None:
                    fail(f"no study with Study Instance UID {study}; see `pacs-triage studies list`")
                study_id = found
            detail = study_detail(node.sessions, study_id)
        except (NotFound, StorageUnavailable) as exc:
            fail(str(exc))
    if as_json:
        _json(
            {
                **{k: v for k, v in asdict(detail).items() if k != "study"},
                "study": _summary_dict(detail.study),
                "findings": detail.findings,
            }
        )
        return
    _show(detail)


def _show(d: StudyDetail) -> None:
    s = d.study
    typer.echo(f"study {s.id}  {s.study_instance_uid}")
    typer.echo(f"  state            {s.state.value}" + (f" (rule {s.route_rule})" if s.route_rule else ""))
    if d.route_detail:
        typer.echo(f"  routing          {d.route_detail}")
    typer.echo(f"  accession        {s.accession_number or '-'}")
    typer.echo(f"  received         {_when(s.first_received_at)} .. {_when(s.last_received_at)} UTC")
    typer.echo(f"  series/instances {s.series_count} / {s.instance_count}")
    typer.echo("triage result:")
    if s.priority is None:
        state = s.job_state.value if s.job_state is not None else "no job"
        typer.echo(f"  none yet (current job: {state})")
    else:
        typer.echo(f"  priority         {s.priority.name}")
        typer.echo(f"  time to result   {_seconds(s.time_to_result_seconds)}")
        for finding in d.findings:
            typer.echo(f"  - {finding}")
    typer.echo("series:")
    for series in d.series:
        typer.echo(
            f"  {series.series_number if series.series_number is not None else '-':>4}  "
            f"{series.modality or '-':<4} {series.instance_count:>5} instances  "
            f"{series.bytes_stored / 2**20:8.1f} MiB  {series.series_description or ''}"
        )
    typer.echo("jobs:")
    for job in d.jobs:
        error = f"  {job.last_error.splitlines()[0][:200]}" if job.last_error else ""
        typer.echo(
            f"  {job.id:>6}  {job.state.value:<10} {job.pipeline:<10} {job.attempts}/{job.max_attempts}{error}"
        )
    typer.echo("results:" if d.results else "results: none")
    for r in d.results:
        typer.echo(f"  {r.id:>6}  {r.priority.name:<7} {r.sop_instance_uid}")
    typer.echo("deliveries:" if d.deliveries else "deliveries: none")
    for dl in d.deliveries:
        status = "-" if dl.last_status is None else f"0x{dl.last_status:04X}"
        typer.echo(f"  {dl.id:>6}  {dl.state.value:<10} {dl.destination} ({dl.peer})  {status}")
    typer.echo("timeline (UTC):")
    for e in d.timeline:
        typer.echo(f"  {_when(e.at)}  {e.entity:<8} {e.entity_id:>6}  {e.kind:<11} {e.detail[:160]}")


def register(studies_app: typer.Typer) -> None:
    studies_app.command("list")(studies_list)
    studies_app.command("show")(studies_show)
