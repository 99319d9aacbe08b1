"""What every ``pacs-triage`` command shares: the ``--config`` option, loading it, failing cleanly."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer

from daemon.config import Config, ConfigError, environment, load_config
from daemon.logs import setup_logging

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="TOML configuration file (see deploy/pacs-triage.example.toml). "
        "Environment variables PACS_TRIAGE_* override it.",
        envvar="PACS_TRIAGE_CONFIG",
        dir_okay=False,
    ),
]


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``pacs-triage: message`` on stderr and exit with ``code`` (2: configuration)."""
    typer.echo(f"pacs-triage: {message}", err=True)
    raise typer.Exit(code)


def load(path: Path | None) -> Config:
    """The configuration (exit 2 with the key named when invalid), logging set up from it."""
    try:
        config = load_config(path, environment())
    except ConfigError as exc:
        fail(str(exc), code=2)
    setup_logging(config.logging.level)
    return config
