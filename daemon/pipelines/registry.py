"""The registry of analysis pipelines by name: the built-in stand-ins (``daemon/pipelines/echo.py``),
the demo and every ``[[pipelines.monai]]`` entry (``daemon/pipelines/monai.py``).

A pipeline takes the files of one study and returns findings (a triage priority and a summary)
and DICOM result objects. It must be deterministic in its input: result UIDs come from the
input fingerprint, so a re-run produces the same objects and a resend is a duplicate.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from daemon.config import Config, ConfigError
from daemon.pipelines.base import AnalysisOutcome, Pipeline, UnknownPipeline
from daemon.pipelines.echo import EchoPipeline, NoopPipeline
from daemon.pipelines.monai import check_specs, monai_factories
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

__all__ = [
    "Pipeline",
    "AnalysisOutcome",
    "Pipelines",
    "UnknownPipeline",
    "builtin_pipelines",
    "check_routing",
]


def builtin_pipelines(config: Config) -> dict[str, Callable[[], Pipeline]]:
    """Pipeline factories by name: the stand-ins, ``demo`` and the configured MONAI pipelines."""
    return {
        "echo": lambda: EchoPipeline(delay_seconds=config.pipelines.echo_delay_seconds),
        "noop": NoopPipeline,
        **monai_factories(config),
    }


class Pipelines:
    """Loads each pipeline once (per worker process) on first use."""

    def __init__(self, config: Config) -> None:
        self.factories = builtin_pipelines(config)
        self._loaded: dict[str, Pipeline] = {}

    def known(self) -> list[str]:
        return sorted(self.factories)

    def get(self, name: str) -> Pipeline:
        if name not in self._loaded:
            factory = self.factories.get(name)
            if factory is None:
                raise UnknownPipeline(
                    f"no pipeline named {name!r} (known: {', '.join(self.known())}); fix routing.rules "
                    f"and retry the job with `pacs-triage jobs retry`"
                )
            self._loaded[name] = factory()
        return self._loaded[name]

    def warm(self, names: Iterable[str]) -> None:
        """Load the named pipelines and their models now (a worker's start), so that the first job
        does not pay for imports and weights. A pipeline that cannot load is logged and left to fail
        its jobs as before (with the error that says what to fix)."""
        for name in sorted(set(names)):
            if name not in self.factories:
                continue
            started = time.perf_counter()
            try:
                pipeline = self.get(name)
                warm = getattr(pipeline, "warm", None)
                if warm is not None:
                    warm()
            except PipelineError as exc:
                log.warning("pipeline %s could not be loaded at start (its jobs will fail): %s", name, exc)
                continue
            log.info("pipeline %s loaded in %.1f s", name, time.perf_counter() - started)


def check_routing(config: Config) -> None:
    """Refuse to start when a routing rule names an unknown pipeline, or a routed MONAI pipeline
    cannot be built (bad selection or thresholds, demo bundles not pinned)."""
    known = builtin_pipelines(config)
    for rule in config.routing.rules:
        if rule.pipeline not in known:
            raise ConfigError(
                f"routing.rules {rule.name!r}: unknown pipeline {rule.pipeline!r}; "
                f"known: {', '.join(sorted(known))}"
            )
    problems = check_specs(config, [rule.pipeline for rule in config.routing.rules])
    if problems:
        raise ConfigError("; ".join(problems))
