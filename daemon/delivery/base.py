"""What the dispatcher needs from a destination: one small protocol, and the two ways a send fails.

    DeliveryFailure          a send (or a check) did not deliver; ``reason`` says why, for operators
     ├── Transient           may pass: unreachable, timed out, aborted, out of resources -> retried
     └── Permanent           will not pass by itself: rejected for good, refused object, broken
                             local configuration -> dead at once (``pacs-triage deliveries retry``)

An adapter (one module per destination kind: ``dicom.py``, ``hl7.py``, ``fhir.py``) maps its
own protocol's failures to these two, and never retries: the outbox row owns attempts, backoff
and dead letters (``storage/outbox.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class DeliveryFailure(Exception):
    """A send or check that did not deliver; ``status`` is the peer's answer code, when it gave one."""

    def __init__(self, reason: str, *, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class Transient(DeliveryFailure):
    """The same send may succeed later: the outbox retries it with backoff."""


class Permanent(DeliveryFailure):
    """The same send will fail again until someone changes something: the delivery is dead at once."""


@dataclass(frozen=True, kw_only=True)
class Outgoing:
    """One result object to deliver."""

    delivery_id: int
    sop_instance_uid: str
    path: Path  # the Part 10 file in the results spool
    content: str = ""  # what to send of it: "" the object as is; "hl7_oru", "fhir"... (config.Content)


@dataclass(frozen=True, kw_only=True)
class Accepted:
    """The destination took the object: its status code, and a note when it warned (kept in the audit)."""

    status: int
    warning: str = ""


class Destination(Protocol):
    """A configured place results go. ``send`` and ``check`` raise :class:`Transient` or
    :class:`Permanent`; nothing else escapes an adapter except a bug."""

    name: str  # the destination's name in the config

    def send(self, item: Outgoing) -> Accepted:
        """Deliver one object, once (no retries)."""
        ...

    def check(self) -> None:
        """Test that the destination is reachable and accepts us (e.g. C-ECHO), sending nothing."""
        ...
