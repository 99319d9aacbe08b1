"""``pacs-triage evaluate``: local validation of a pipeline on a site's own labelled cases."""

from __future__ import annotations

import csv
import datetime
import json
import os
from collections.abc import Generator
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Annotated, Any

import typer

from daemon.cli.common import ConfigOption
from daemon.cli.common import fail as _fail
from daemon.cli.offline import load_pipeline

EVALUATE_HELP = """Run PIPELINE on every case under CASES and measure it against --truth; write REPORT_DIR.

CASES holds one folder per case (its DICOM files, any layout). --truth (repeatable) is a folder with
one mask per case, named after the case folder (CASE.nii.gz, CASE.nii or CASE.dcm, a DICOM SEG), and
optionally labels.csv; or a CSV file of study-level labels (columns `case` and `label`, 1/0).

The report (REPORT_DIR/report.html with plots, REPORT_DIR/report.json): per case Dice, volume error
and lesion-wise sensitivity/PPV by size band; study level sensitivity, specificity, PPV, NPV, F1 and
ROC AUC with bootstrap 95 % CIs; the confusion matrix at the threshold (--threshold, else the
pipeline's urgent_probability, else 0.5) and the threshold reaching --target-sensitivity; a
reliability diagram; every refusal and failure with its reason.

Cases run in parallel (--jobs processes). Per-case results (CASE.json) and predicted masks
(CASE.pred.nii.gz, on the series grid) are kept in REPORT_DIR/cases/: a re-run
skips every case whose study, truth mask and pipeline are unchanged (resumable after an interruption).

Exit status: 0 report written; 1 no case could be analysed (report still written); 2 usage.
"""

# Per worker process: the pipeline, built once by the pool's initializer.
_worker: dict[str, Any] = {}


def _init(config: Any, name: str, threads: int) -> None:
    import torch

    from daemon.pipelines.registry import Pipelines

    torch.set_num_threads(max(threads, 1))
    _worker["pipeline"] = Pipelines(config).factories[name]()


def _work(task: Any, key: str, started: datetime.datetime, mask_out: Path) -> dict[str, Any]:
    from daemon.pipelines.evaluation import evaluate_case

    return evaluate_case(_worker["pipeline"], task, key=key, analysis_started=started, mask_out=mask_out)


def _read_labels(path: Path) -> dict[str, bool]:
    labels: dict[str, bool] = {}
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"case", "label"} <= set(reader.fieldnames):
            _fail(
                f"{path}: a labels CSV needs the columns `case` and `label`, got {reader.fieldnames}", code=2
            )
        for line, row in enumerate(reader, start=2):
            value = (row["label"] or "").strip().lower()
            if value not in {"0", "1", "true", "false", "yes", "no"}:
                _fail(f"{path}:{line}: label must be 1/0 (or true/false), got {row['label']!r}", code=2)
            labels[row["case"].strip()] = value in {"1", "true", "yes"}
    return labels


def _truth(sources: list[Path]) -> tuple[dict[str, Path], dict[str, bool]]:
    masks: dict[str, Path] = {}
    labels: dict[str, bool] = {}
    for source in sources:
        if source.is_file() and source.suffix.lower() == ".csv":
            labels.update(_read_labels(source))
        elif source.is_dir():
            for path in sorted(source.iterdir()):
                if path.name.lower().endswith(".csv"):
                    labels.update(_read_labels(path))
                    continue
                for suffix in (".nii.gz", ".nii", ".dcm"):
                    if path.name.endswith(suffix):
                        masks[path.name[: -len(suffix)]] = path
        else:
            _fail(f"--truth {source}: neither a folder of masks nor a CSV file", code=2)
    return masks, labels


def _cases(root: Path) -> list[Path]:
    cases = sorted(p for p in root.iterdir() if p.is_dir())
    if not cases:
        _fail(f"{root} holds no case folders: put each case's DICOM files in a folder of its own", code=2)
    return cases


def _progress(total: int) -> Generator[None, None, None]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(
        TextColumn("evaluating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, disable=not console.is_terminal,
    ) as bar:  # fmt: skip
        task = bar.add_task("cases", total=total)
        while True:
            yield
            bar.advance(task)


def evaluate(
    pipeline: Annotated[str, typer.Argument(help="Pipeline name (demo or a [[pipelines.monai]] name).")],
    cases: Annotated[Path, typer.Argument(help="Folder of case folders.", exists=True, file_okay=False)],
    truth: Annotated[
        list[Path], typer.Option("--truth", help="Masks folder and/or labels CSV (repeatable).", exists=True)
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="Report folder (created; per-case results cached in it).", file_okay=False
        ),
    ],
    threshold: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help="Study-level threshold on the score.")
    ] = None,
    target_sensitivity: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Report the threshold reaching this sensitivity.")
    ] = 0.95,
    jobs: Annotated[int, typer.Option(min=1, help="Worker processes (default: CPU cores, at most 4).")] = min(
        os.cpu_count() or 1, 4
    ),
    bootstrap: Annotated[
        int, typer.Option(min=100, help="Bootstrap resamples for the confidence intervals.")
    ] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    config_path: ConfigOption = None,
) -> None:
    from daemon.pipelines.evaluation import CaseTask, case_key
    from daemon.pipelines.monai import MonaiPipeline
    from daemon.pipelines.offline import NoDicomInput, collect_study
    from pipeline.evaluation.report import build_report, render_html

    config, factory = load_pipeline(config_path, pipeline)
    instance = factory()
    if not isinstance(instance, MonaiPipeline):
        _fail(
            f"pipeline {pipeline!r} has no model to evaluate; choose demo or a [[pipelines.monai]] one",
            code=2,
        )
    masks, labels = _truth(truth)
    (out / "cases").mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now().replace(microsecond=0)
    records: dict[str, dict[str, Any]] = {}
    pending: list[tuple[CaseTask, str]] = []
    cached = 0
    for folder in _cases(cases):
        try:
            study = collect_study([folder])
        except NoDicomInput as exc:
            records[folder.name] = {"case": folder.name, "status": "refused", "reason": str(exc)}
            continue
        task = CaseTask(folder.name, study, masks.get(folder.name))
        key = case_key(instance, task)
        cache = out / "cases" / f"{folder.name}.json"
        if cache.is_file():
            previous = json.loads(cache.read_text(encoding="utf-8"))
            if previous.get("key") == key and previous.get("status") in ("ok", "refused"):  # failed: retried
                records[folder.name] = previous
                cached += 1
                continue
        pending.append((task, key))
    if cached:
        typer.echo(f"{cached} case(s) unchanged since the last run: taken from {out / 'cases'}", err=True)
    workers = min(jobs, len(pending)) or 1
    bar = _progress(len(pending))
    next(bar)
    if pending:
        with ProcessPoolExecutor(workers, mp_context=_spawn(), initializer=_init,
                                 initargs=(config, pipeline, (os.cpu_count() or 1) // workers)) as pool:  # fmt: skip
            futures = {
                pool.submit(_work, task, key, started, out / "cases" / f"{task.name}.pred.nii.gz"): task.name
                for task, key in pending
            }
            for future in as_completed(futures):
                try:
                    record = future.result()
                except Exception as exc:  # noqa: BLE001 - the case boundary: one broken case is recorded, the rest go on
                    record = {
                        "case": futures[future],
                        "status": "failed",
                        "reason": f"{type(exc).__name__}: {exc}",
                    }
                _write_json(out / "cases" / f"{futures[future]}.json", record)
                records[futures[future]] = record
                next(bar)
    bar.close()
    configured = instance.spec.thresholds.urgent_probability
    used, source = (
        (threshold, "--threshold") if threshold is not None
        else (configured, "the pipeline's urgent_probability") if configured is not None
        else (0.5, "default")
    )  # fmt: skip
    report = build_report(
        [records[name] for name in sorted(records)], labels=labels, pipeline=pipeline, threshold=used,
        threshold_source=source, target_sensitivity=target_sensitivity,
        generated_at=started.isoformat(sep=" "), resamples=bootstrap, seed=seed,
    )  # fmt: skip
    _write_json(out / "report.json", report)
    (out / "report.html").write_text(render_html(report), encoding="utf-8")
    c = report["counts"]
    typer.echo(f"{c['cases']} cases: {c['ok']} analysed, {c['refused']} refused, {c['failed']} failed")
    for failure in report["failures"]:
        typer.echo(f"  {failure['case']}: {failure['status']}: {failure['reason']}")
    metrics = report["study"].get("metrics", {})
    for name in ("sensitivity", "specificity", "roc_auc"):
        if name in metrics and metrics[name]["value"] is not None:
            m = metrics[name]
            typer.echo(f"  {name} {m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}]")
    dice = report["segmentation"]["mean_dice"]
    if dice["value"] is not None:
        typer.echo(f"  mean Dice {dice['value']:.3f}")
    typer.echo(f"report: {out / 'report.html'} and {out / 'report.json'}")
    if not c["ok"]:
        raise typer.Exit(1)


def _spawn() -> Any:
    import multiprocessing

    return multiprocessing.get_context("spawn")  # torch's threads do not survive a fork


def _write_json(path: Path, value: Any) -> None:
    """Write atomically: an interrupted run never leaves a half-written cached case."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)


def register(app: typer.Typer) -> None:
    """Mount ``evaluate`` on the main app."""
    app.command("evaluate", help=EVALUATE_HELP)(evaluate)
