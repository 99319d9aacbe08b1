"""``pacs-triage bundle check``: what a MONAI bundle will do here, before it is deployed."""

from __future__ import annotations

import datetime
import json
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from daemon.cli.common import ConfigOption
from daemon.cli.common import fail as _fail
from daemon.cli.common import load as _config
from daemon.cli.offline import progress

if TYPE_CHECKING:
    from pipeline.bundle_inspect import BundleSummary, ChannelRule
    from pipeline.multiseries import MultiSeriesInput

bundle_app = typer.Typer(help="Check MONAI Model Zoo bundles before deploying them.", no_args_is_help=True)

CHECK_HELP = """Check a MONAI bundle: parse it, verify its weights, run it once, write the SR it would send.

Lists what the runtime honours (network, preprocessing, inferer, postprocessing), replaces (file
loading and saving, the device) and removes (data loaders, handlers, evaluator, checkpoint loader);
the packages and MONAI version the bundle declares; the labels. Verifies the bundle's sha256 against
its pin (--sha256, the [[pipelines.monai]] entry that names this directory, or PINS.json beside it)
and its weights against the hashes in its large_files.yml. Then runs one inference through the
service's pipeline code on --input (DICOM files or a folder; default: a small synthetic CT written
to --out/input) and reports the time and the process's peak memory. A bundle whose metadata.json
names several input channels (brats: T1c, T1, T2, FLAIR) takes one series of the --input study per
channel, stacked as the service stacks them: each channel's series is the one whose Series
Description names the channel (case-insensitive, as a word, and no other channel after it: "T2
FLAIR" is FLAIR's), or matches --channel NAME=REGEX; a missing channel fails the check (exit 1).
--random-weights gives the network seeded random weights (a copy of the bundle under --out), for bundles shipped without
weights: the outputs are then meaningless but show that the bundle runs here unchanged.

Writes into --out: check.json (everything reported) and the result objects (SR.dcm, SEG.dcm...).
Exit status: 0 every check passed; 1 a check failed (pin, weights, build, inference); 2 usage.
"""


def _pins(config: Any, bundle: Path, given: str | None) -> list[tuple[str, str]]:
    """(where, sha256) of every pin of this bundle directory that is known."""
    pins = [("--sha256", given.strip().lower())] if given else []
    resolved = bundle.resolve()
    for entry in config.pipelines.monai:
        for role in ("segmentation", "classification", "detection"):
            item = getattr(entry, role, None)
            if item is not None and Path(item.path).resolve() == resolved:
                pins.append((f"pipelines.monai {entry.name!r} {role}", item.sha256))
    pins_file = resolved.parent / "PINS.json"
    if pins_file.is_file():
        try:
            table = json.loads(pins_file.read_text(encoding="utf-8")).get("sha256", {})
        except (ValueError, AttributeError):
            table = {}
        if isinstance(table, dict) and isinstance(table.get(resolved.name), str):
            pins.append((str(pins_file), table[resolved.name]))
    return pins


def _default_input(out: Path) -> Path:
    from pipeline.demo.phantom import PhantomOptions, write_phantom_series

    target = out / "input"
    write_phantom_series(target, seed=0, lesions=1, slices=32,
                         options=PhantomOptions(matrix=192, pixel_spacing_mm=2.0))  # fmt: skip
    return target


def _channel_options(values: list[str]) -> dict[str, str]:
    given: dict[str, str] = {}
    for value in values:
        name, sep, pattern = value.partition("=")
        if not sep or not name.strip() or not pattern:
            _fail(f"--channel {value!r}: use NAME=REGEX, e.g. --channel 'T1c=post.*gad|t1c'", code=2)
        if name.strip().casefold() in {k.casefold() for k in given}:
            _fail(f"--channel {name}: given twice", code=2)
        given[name.strip()] = pattern
    return given


def _needs_series(summary: Any) -> str:
    """Why a multi-channel bundle cannot run without --input, and how to name its series."""
    names = summary.input_channels
    return (
        f"bundle {summary.name} takes {len(names)} {summary.input_modality or 'image'} series of one study as its "
        f"input channels ({', '.join(names)}): give --input with a study (files or folder) holding one series per "
        f"channel, whose Series Descriptions name the channels (e.g. {', '.join(repr('AX ' + n) for n in names)}), "
        f"or say which series is which with --channel NAME=REGEX (e.g. --channel '{names[0]}=post.*gad')"
    )


def _overrides(values: list[str]) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    for value in values:
        key, sep, text = value.partition("=")
        if not sep or not key:
            _fail(f"--override {value!r}: use ID=JSON, e.g. displayable_configs#highres=false", code=2)
        try:
            parsed[key] = json.loads(text)
        except ValueError:
            parsed[key] = text
    return parsed


@bundle_app.command("check", help=CHECK_HELP)
def check(
    bundle: Annotated[
        Path, typer.Argument(help="The bundle directory (configs/, models/).", exists=True, file_okay=False)
    ],
    input_path: Annotated[
        list[Path] | None, typer.Option("--input", help="DICOM files or folder of one study.", exists=True)
    ] = None,
    random_weights: Annotated[
        bool, typer.Option("--random-weights", help="Run with seeded random weights.")
    ] = False,
    out: Annotated[
        Path, typer.Option("--out", help="Folder for check.json and the results.", file_okay=False)
    ] = Path("bundle-check"),
    sha256: Annotated[str | None, typer.Option(help="The sha256 the bundle is pinned by.")] = None,
    override: Annotated[
        list[str] | None, typer.Option(help="ID=JSON for inference.json, e.g. inferer#sw_batch_size=1.")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when present).")] = None,
    channel: Annotated[
        list[str] | None,
        typer.Option(
            "--channel",
            help="NAME=REGEX: a multi-channel bundle's channel NAME takes the series whose Series Description "
            "matches REGEX (case-insensitive; default: the one naming the channel). Repeatable.",
        ),
    ] = None,
    config_path: ConfigOption = None,
) -> None:
    from daemon.config.pipelines import DEFAULT_MAX_KEY_IMAGES, DEFAULT_MIN_LESION_ML
    from daemon.pipelines.monai import MonaiPipeline
    from daemon.pipelines.offline import NoDicomInput, analyse, collect_study, jsonable, write_results
    from pipeline.bundle_inspect import channel_rules, describe_bundle, random_weights_copy, weight_hashes
    from pipeline.bundle_pins import bundle_sha256
    from pipeline.errors import BundleError, PipelineError
    from pipeline.multiseries import Channel, MultiSeriesInput
    from pipeline.orientation import ORIENTATIONS
    from pipeline.series_select import SelectionRule
    from pipeline.spec import BundleSpec, PipelineSpec

    config = _config(config_path)
    out.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    try:
        summary = describe_bundle(bundle)
    except BundleError as exc:
        _fail(str(exc), code=2)
    typer.echo(f"bundle {summary.name} {summary.version} (declares MONAI {summary.monai_version}); {summary.kind}; "
               f"input {summary.input_modality or 'unknown'}; labels {', '.join(summary.labels) or '?'}")  # fmt: skip
    if summary.declared_packages:
        typer.echo(
            "  declared packages: " + ", ".join(f"{k} {v}" for k, v in summary.declared_packages.items())
        )
    if summary.multiseries:
        typer.echo(f"  input: {summary.num_channels} channels (metadata.json num_channels), channel_def "
                   + ", ".join(f"{i} {n}" for i, n in enumerate(summary.input_channels))
                   + f": one series each, stacked on {summary.input_channels[0]}'s grid")  # fmt: skip
    else:
        typer.echo(f"  input: {summary.num_channels} channel(s) (metadata.json num_channels) of one series")
    if channel and not summary.multiseries:
        _fail(
            f"--channel: bundle {summary.name} takes one series (its metadata.json names no input channels)",
            code=2,
        )
    try:
        rules = channel_rules(summary.input_channels, _channel_options(channel or []))
    except ValueError as exc:
        _fail(str(exc), code=2)
    if summary.multiseries and not input_path:
        _fail(_needs_series(summary), code=2)
    for item in summary.items:
        typer.echo(f"  {item.action:<10} {item.id}: {item.detail}")

    has_weights = (bundle / "models").is_dir() and any(p.is_file() for p in (bundle / "models").rglob("*"))
    actual = bundle_sha256(bundle) if has_weights else None
    pins = _pins(config, bundle, sha256)
    pin_report = []
    for where, pinned in pins:
        ok = actual is not None and pinned == actual
        pin_report.append({"pinned_by": where, "sha256": pinned, "matches": ok})
        typer.echo(f"  pin {where}: {'matches' if ok else 'DOES NOT MATCH'} ({pinned})")
        if not ok and not random_weights:
            problems.append(f"sha256 pinned by {where} is {pinned}, the bundle's is {actual}")
    if actual is not None:
        typer.echo(
            f"  bundle sha256 {actual}" + ("" if pins else " (not pinned anywhere: put it in the config)")
        )
    hashes = weight_hashes(bundle)
    for h in hashes:
        state = "absent" if h.actual is None else ("ok" if h.ok else "MISMATCH")
        typer.echo(f"  weights {h.path} ({h.hash_type} from large_files.yml): {state}")
        if h.actual is not None and not h.ok:
            problems.append(f"{h.path}: {h.hash_type} {h.actual}, large_files.yml says {h.expected}")

    overrides = _overrides(override or [])
    run_dir = bundle.resolve()
    if random_weights:
        try:
            run_dir = random_weights_copy(
                bundle, out / "random-weights" / bundle.resolve().name, overrides=overrides
            )
        except BundleError as exc:
            problems.append(str(exc))
            _finish(out, summary, pin_report, hashes, None, problems)
        typer.echo(f"  random weights (seed 0) in {run_dir}")
    elif not has_weights:
        problems.append(
            f"bundle {bundle} has no weights in models/: fetch them (large_files.yml) or use --random-weights"
        )
        _finish(out, summary, pin_report, hashes, None, problems)

    if input_path:
        paths = list(input_path)
    elif summary.input_modality in ("", "CT"):
        paths = [_default_input(out)]
        typer.echo(f"  input: a synthetic CT phantom in {paths[0]}")
    else:
        _fail(
            f"bundle {summary.name} expects {summary.input_modality}: give --input with such a study", code=2
        )
    try:
        study = collect_study(paths)
    except NoDicomInput as exc:
        _fail(str(exc), code=2)
    modalities = frozenset({summary.input_modality} if summary.input_modality else {"CT", "MR"})
    multiseries, assignment = None, None
    if summary.multiseries:
        multiseries = MultiSeriesInput(channels=tuple(
            Channel(name=r.name, rule=SelectionRule(modalities=modalities, orientations=ORIENTATIONS,
                                                    series_description=r.series_description))
            for r in rules
        ))  # fmt: skip
        assignment = _assign_channels(
            study.files, multiseries, rules, out, summary, pin_report, hashes, problems
        )
    under_test = BundleSpec(path=run_dir, sha256=bundle_sha256(run_dir), allowed_dirs=(run_dir.parent,),
                            overrides=overrides, device=device)  # fmt: skip
    spec = PipelineSpec(
        name="bundle-check",
        version=summary.version,
        selection=SelectionRule(modalities=modalities, orientations=ORIENTATIONS)
        if multiseries is None
        else multiseries.reference.rule,
        multiseries=multiseries,
        # the bundle's own kind (pipeline.bundle_inspect.declared_kind) decides the pipeline's
        segmentation=under_test if summary.kind == "segmentation" else None,
        classification=under_test if summary.kind == "classification" else None,
        detection=under_test if summary.kind == "detection" else None,
        # as a [[pipelines.monai]] entry runs by default: no specks as lesions, a bounded number of key images
        min_lesion_ml=DEFAULT_MIN_LESION_ML,
        max_key_images=DEFAULT_MAX_KEY_IMAGES,
    )
    before = time.perf_counter()
    try:
        with progress(f"{summary.name}: one inference on {len(study.files)} files"):
            result = analyse(MonaiPipeline("bundle-check", spec), study,
                             analysis_started=datetime.datetime.now().replace(microsecond=0))  # fmt: skip
    except PipelineError as exc:
        problems.append(f"inference: {exc}")
        _finish(out, summary, pin_report, hashes, None, problems)
    except Exception as exc:  # noqa: BLE001 - the check's boundary: whatever the bundle raises is its finding
        problems.append(f"inference raised {type(exc).__name__}: {exc}")
        _finish(out, summary, pin_report, hashes, None, problems)
    seconds = time.perf_counter() - before
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    run: dict[str, Any] = {"seconds": seconds, "peak_rss_mib": peak, "stage_seconds": dict(result.stage_seconds),
                           "priority": result.priority.name, "summary": result.summary, "findings": result.findings}  # fmt: skip
    if assignment is not None:
        run["channels"] = assignment
    import torch

    if torch.cuda.is_available():
        run["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    written = write_results(result.datasets, out)
    run["results"] = [p.name for p in written]
    typer.echo(f"  inference: {seconds:.1f} s, peak memory {peak:.0f} MiB"
               + (f", CUDA {run['peak_cuda_mib']:.0f} MiB" if "peak_cuda_mib" in run else ""))  # fmt: skip
    typer.echo(f"  {result.summary}")
    for path in written:
        typer.echo(f"  wrote {path}")
    _finish(out, summary, pin_report, hashes, jsonable(run), problems)


def _assign_channels(
    files: Sequence[Path],
    inputs: MultiSeriesInput,
    rules: Sequence[ChannelRule],
    out: Path,
    summary: BundleSummary,
    pins: list[Any],
    hashes: Any,
    problems: list[str],
) -> list[dict[str, str]]:
    """Which series goes to which channel and why, printed (pipeline.multiseries.select_channels: the
    service's selection); a missing channel fails the check (exit 1) with the reason naming it."""
    import pydicom

    from pipeline.errors import NoUsableSeries
    from pipeline.multiseries import select_channels

    try:
        chosen = select_channels(files, inputs, pipeline="bundle-check")
    except NoUsableSeries as exc:
        problems.append(f"input: {exc}")
        for index, rule in enumerate(rules):
            typer.echo(f"  channel {index} {rule.name}: {rule.why}")
        typer.echo(
            "  give a missing channel's series with --channel NAME=REGEX (searched in Series Description)"
        )
        _finish(out, summary, pins, hashes, None, problems)
    assignment = []
    for index, (rule, selected) in enumerate(zip(rules, chosen.series, strict=True)):
        description = str(
            pydicom.dcmread(selected.paths[0], stop_before_pixels=True).get("SeriesDescription", "")
        )
        number = "" if selected.series_number is None else f"#{selected.series_number} "
        typer.echo(f"  channel {index} {rule.name} <- series {number}'{description}' "
                   f"{selected.series_instance_uid}: {rule.why}")  # fmt: skip
        assignment.append({"channel": rule.name, "series_instance_uid": selected.series_instance_uid,
                           "series_description": description, "why": rule.why, "selection": selected.reason})  # fmt: skip
    return assignment


def _finish(out: Path, summary: Any, pins: list[Any], hashes: Any, run: Any, problems: list[str]) -> None:
    from daemon.pipelines.offline import jsonable

    report = {
        "bundle": jsonable(summary),
        "pins": pins,
        "weights": jsonable(hashes),
        "run": run,
        "problems": problems,
    }
    (out / "check.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    for problem in problems:
        typer.echo(f"pacs-triage: {problem}", err=True)
    raise typer.Exit(1 if problems else 0)
