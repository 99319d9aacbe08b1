"""Triage priority: found by the pipeline, set by a routing rule, ordering the job queue and the outbox."""

from __future__ import annotations

import enum
from typing import Literal, get_args


class Priority(enum.IntEnum):
    """Triage priority of a study; a higher value is read (and claimed from the queue) first.

    The integer values are what the ``jobs``, ``results`` and ``deliveries`` tables store; the
    lower-case names are what a routing rule's ``priority`` says (``"routine"``, ``"urgent"``,
    ``"stat"``). Neither may change.
    """

    ROUTINE = 0  # nothing above the configured thresholds
    URGENT = 1  # a finding above the urgent threshold
    STAT = 2  # a finding above the critical threshold: read now

    @classmethod
    def from_name(cls, name: str) -> Priority:
        """The priority called ``name`` in any case (``"stat"``, ``"URGENT"``); ValueError names the choices."""
        try:
            return cls[name.strip().upper()]
        except KeyError:
            choices = ", ".join(p.name.lower() for p in cls)
            raise ValueError(f"unknown priority {name!r}: choose one of {choices}") from None


#: How a priority is spelled in configuration files, on the command line and in the HTTP API: its name
#: in lower case. (A Literal, so that pydantic and OpenAPI show the choices.)
PriorityName = Literal["routine", "urgent", "stat"]

if get_args(PriorityName) != tuple(p.name.lower() for p in Priority):  # one vocabulary, kept in step
    raise RuntimeError("vocabulary.PriorityName must list the names of vocabulary.Priority, in order")
