"""Destination kinds: the config's ``kind`` -> the adapter that sends to it.

A new kind is one adapter module and one line in :data:`KINDS`; the dispatcher
does not change.
"""

from __future__ import annotations

from collections.abc import Callable

from daemon.config import DestinationConfig
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
