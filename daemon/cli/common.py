"""What every ``pacs-triage`` command shares: the ``--config`` option, loading it, failing cleanly."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer

from daemon.config import Config, ConfigError, environment
from daemon.config.sources import Source
from daemon.config.sources import load as load_sources
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
    """The configuration (exit 2 with the key named when invalid), logging set up from it.

    Without ``--config`` and ``PACS_TRIAGE_HOME`` the data directory is the built-in default; the
    command says so on stderr, so that a wrong account or a forgotten variable is not mistaken for
    an empty node.
    """
    env = environment()
    try:
        loaded = load_sources(path, env)
    except ConfigError as exc:
        fail(str(exc), code=2)
    config = loaded.config
    setup_logging(config.logging)
    if path is None and loaded.provenance.origin(("home",)).source is Source.DEFAULT:
        typer.echo(
            f"pacs-triage: using the default home {config.home} "
            "(no --config, PACS_TRIAGE_CONFIG or PACS_TRIAGE_HOME given)",
            err=True,
        )
    return config
