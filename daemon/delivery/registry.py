"""Destination kinds: the config's ``kind`` -> the adapter that sends to it.

A new kind is one adapter module and one line in :data:`KINDS`; the dispatcher
does not change.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

from daemon.config import Config, ConfigError, DestinationConfig
from daemon.delivery import dicom, fhir, hl7
from daemon.delivery.base import Destination, Permanent

Factory = Callable[[DestinationConfig, str], Destination]  # (destination, our calling AE title)

KINDS: dict[str, Factory] = {
    "dicom": dicom.DicomDestination,
    "hl7": hl7.Hl7Destination,
    "fhir": fhir.FhirDestination,
}


def build(destination: DestinationConfig, *, calling_ae: str) -> Destination:
    """The adapter for ``destination``; :class:`Permanent` when its kind has none."""
    factory = KINDS.get(destination.kind)
    if factory is None:
        raise Permanent(
            f"destination {destination.name!r} has kind {destination.kind!r}, which this version cannot "
            f"send to (known: {', '.join(sorted(KINDS))})"
        )
    return factory(destination, calling_ae)


# The modules each kind needs beyond the base install, and the extra that brings them.
EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "hl7": ("hl7", ("hl7",)),
    "fhir": ("fhir", ("fhir.resources", "httpx")),
}


def check_destinations(config: Config) -> None:
    """Refuse to start when a configured destination's kind needs a package that is not installed
    (``serve`` and ``pacs-triage config check``): the message names the package and the extra."""
    problems = []
    for destination in config.all_destinations:
        extra, modules = EXTRAS.get(destination.kind, ("", ()))
        missing = [m for m in modules if _missing(m)]
        if missing:
            problems.append(
                f"destination {destination.name!r} (kind {destination.kind!r}) needs {', '.join(missing)}: "
                f"install the {extra!r} extra (pip install 'pacs-triage[{extra}]')"
            )
    if problems:
        raise ConfigError("; ".join(problems))


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # a parent package missing, or a module set to None
        return True
