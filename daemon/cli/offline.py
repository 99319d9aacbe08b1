"""``pacs-triage run``: analyse DICOM files or folders offline, through the service's own pipeline code."""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from daemon.cli.common import ConfigOption
from daemon.cli.common import fail as _fail
from daemon.cli.common import load as _config

if TYPE_CHECKING:
    from daemon.config import Config
    from daemon.pipelines.base import Pipeline


RUN_HELP = """Analyse DICOM files or folders offline with PIPELINE, as the service would.

The same code as a worker runs (series selection, geometry, model, writers), with the
configuration's pipelines (`demo`, `echo` and every [[pipelines.monai]] entry). Writes into --out:
the result objects (SR.dcm, SEG.dcm, KEY_nn.dcm, KOS.dcm), findings.json (priority, findings,
classifications, the series used and why) and timings.json (seconds per stage). Nothing is sent
and no database is touched.

Exit status: 0 a result was written; 1 the study was refused (the reason is printed and written to
--out/refused.txt: no usable series, geometry, bundle); 2 usage (unknown pipeline, no DICOM files,
bad options); 3 out of resources (memory, device): try again or on another host.
"""


@contextmanager
def progress(description: str) -> Iterator[None]:
    """A spinner with the elapsed time on stderr while long work runs (nothing when not a terminal)."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    ) as bar:
        bar.add_task(description, total=None)
        yield


def load_pipeline(config_path: Path | None, name: str) -> tuple[Config, Callable[[], Pipeline]]:
    """The configuration and a factory of the pipeline ``name`` (exit 2 naming the known ones)."""
    from daemon.pipelines.registry import Pipelines

    config = _config(config_path)
    pipelines = Pipelines(config)
    if name not in pipelines.factories:
        _fail(f"unknown pipeline {name!r}; known: {', '.join(pipelines.known())}", code=2)
    return config, pipelines.factories[name]


def run(
    pipeline: Annotated[
        str, typer.Argument(help="Pipeline name: demo, echo, or a [[pipelines.monai]] name.")
    ],
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders of ONE study (recursive).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the results (created).", file_okay=False)],
    config_path: ConfigOption = None,
) -> None:
    from daemon.pipelines.offline import NoDicomInput, analyse, collect_study, write_results
    from pipeline.errors import BundleError, PermanentError, TransientError

    _, factory = load_pipeline(config_path, pipeline)
    try:
        study = collect_study(paths)
    except NoDicomInput as exc:
        _fail(str(exc), code=2)
    out.mkdir(parents=True, exist_ok=True)
    (out / "refused.txt").unlink(missing_ok=True)
    started = datetime.datetime.now().replace(microsecond=0)  # the results' Content Date/Time (IHE AIR)
    try:
        with progress(f"{pipeline}: analysing {len(study.files)} DICOM files"):
            instance = factory()
            result = analyse(instance, study, analysis_started=started)
    except (PermanentError, BundleError) as exc:
        (out / "refused.txt").write_text(f"{exc}\n", encoding="utf-8")
        _fail(f"refused: {exc}", code=1)
    except TransientError as exc:
        _fail(f"could not finish: {exc}", code=3)
    written = write_results(result.datasets, out)
    findings = {
        "pipeline": result.pipeline,
        "version": result.version,
        "input_fingerprint": result.input_fingerprint,
        "inputs": len(study.files),
        "skipped_non_dicom": [str(p) for p in study.skipped],
        **result.findings,
        "results": [{"file": p.name, "sop_class_uid": str(ds.SOPClassUID), "sop_instance_uid": str(ds.SOPInstanceUID)}
                    for p, ds in zip(written, result.datasets, strict=True)],
    }  # fmt: skip
    (out / "findings.json").write_text(json.dumps(findings, indent=2) + "\n", encoding="utf-8")
    timings = {**{k: round(v, 4) for k, v in result.stage_seconds.items()}}
    timings["total"] = round(sum(result.stage_seconds.values()), 4)
    (out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n", encoding="utf-8")
    typer.echo(f"priority {result.priority.name}: {result.summary}")
    for path in written:
        typer.echo(f"  wrote {path}")
    if result.stage_seconds:
        typer.echo("  stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in result.stage_seconds.items()))


def register(app: typer.Typer) -> None:
    """Mount ``run`` on the main app."""
    app.command("run", help=RUN_HELP)(run)
