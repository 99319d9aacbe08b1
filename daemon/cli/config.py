"""``pacs-triage config``: inspect the configuration a command would run with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from daemon.cli.common import ConfigOption, fail
from daemon.config import ENV_PREFIX, ConfigError, LoadedConfig, Source, environment, load
from daemon.config.report import Setting, mask_text, settings

config_app = typer.Typer(
    help="Inspect the configuration: the effective values and where each one comes from.",
    no_args_is_help=True,
)


@config_app.command("check")
def check(
    config_path: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Validate the configuration and print every effective value with its source.

    Reads what `serve` reads: the embedded defaults, the TOML file (--config or PACS_TRIAGE_CONFIG)
    and the PACS_TRIAGE_* environment variables (which win). Each value is shown with its source:
    default, file, or the variable that set it. Secrets (tokens, passwords, the password of a
    database URL) are masked.

    Exit status: 0 when the configuration is valid; 2 when it is not, with one message naming each
    bad key (or unknown PACS_TRIAGE_* variable) and where it was set. Nothing is started and the
    database is not opened.
    """
    from daemon.delivery.registry import check_destinations
    from daemon.pipelines.registry import check_routing

    try:
        loaded = load(config_path, environment())
        check_routing(loaded.config)  # what `serve` refuses at start: unknown or unbuildable pipelines
        check_destinations(loaded.config)  # ...and destinations whose extra is not installed
    except ConfigError as exc:
        fail(str(exc), code=2)
    values = settings(loaded)
    if as_json:
        typer.echo(json.dumps(_as_json(loaded, values), indent=2))
        return
    _echo_text(loaded, values)


def _derived(loaded: LoadedConfig) -> dict[str, Any]:
    """Values the node computes from the keys (what a defaulted path or URL ends up as)."""
    config = loaded.config
    return {
        "database": mask_text(config.effective_database_url),
        "spool_dir": str(config.spool_dir),
        "results_dir": str(config.results_dir),
        "destinations": [d.peer for d in config.all_destinations],
    }


def _source(setting: Setting) -> str:
    origin = setting.origin
    if origin.source is Source.ENVIRONMENT:
        return f"environment {origin.detail}"
    return origin.source.value


def _as_json(loaded: LoadedConfig, values: list[Setting]) -> dict[str, Any]:
    path = loaded.provenance.path
    return {
        "valid": True,
        "file": None if path is None else str(path),
        "environment": sorted(set(loaded.provenance.env_keys.values())),
        "settings": [
            {"key": s.key, "value": s.value, "source": s.origin.source.value, "from": s.origin.detail}
            for s in values
        ],
        "derived": _derived(loaded),
    }


def _echo_text(loaded: LoadedConfig, values: list[Setting]) -> None:
    path = loaded.provenance.path
    variables = sorted(set(loaded.provenance.env_keys.values()))
    typer.echo("configuration is valid")
    typer.echo(f"  file:         {_file_line(path)}")
    typer.echo(f"  environment:  {', '.join(variables) if variables else f'no {ENV_PREFIX}* variables'}")
    typer.echo("")
    rows = [(s.key, json.dumps(s.value), _source(s)) for s in values]
    key_width = max(len(r[0]) for r in rows)
    value_width = min(max(len(r[1]) for r in rows), 40)
    for key, value, source in rows:
        typer.echo(f"{key:<{key_width}}  {value:<{value_width}}  {source}".rstrip())
    typer.echo("")
    typer.echo("derived:")
    for key, value in _derived(loaded).items():
        typer.echo(f"  {key:<12}  {json.dumps(value) if isinstance(value, list) else value}")


def _file_line(path: Path | None) -> str:
    return "none (embedded defaults and environment only)" if path is None else str(path)
