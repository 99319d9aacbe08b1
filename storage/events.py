"""The audit log: one append-only ``events`` row per state change of a study, job, result or delivery.

Rows are written in the caller's transaction, so a state change and its audit row commit (or
roll back) together. ``detail`` is a JSON object with sorted keys, or empty.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.models import Event


@dataclass(frozen=True, kw_only=True)
class EventView:
    """One audit row as operators see it."""

    at: dt.datetime
    entity: str  # study | series | instance | job | result | delivery
    entity_id: str
    kind: str  # the new state ("queued", "running", ...) or what happened ("created", "reopened")
    detail: str  # JSON object, or "" when there is none

    @classmethod
    def from_row(cls, event: Event) -> EventView:
        return cls(
            at=event.at, entity=event.entity, entity_id=event.entity_id, kind=event.kind, detail=event.detail
        )


def add_event(session: Session, entity: str, entity_id: str | int, kind: str, **detail: object) -> None:
    """Append one audit row (in the caller's transaction)."""
    session.add(
        Event(
            at=dt.datetime.now(dt.UTC),
            entity=entity,
            entity_id=str(entity_id),
            kind=kind,
            detail=json.dumps(detail, default=str, sort_keys=True) if detail else "",
        )
    )


def history(session: Session, entity: str, entity_id: str | int) -> list[EventView]:
    """The audit trail of one entity, oldest first."""
    query = select(Event).where(Event.entity == entity, Event.entity_id == str(entity_id)).order_by(Event.id)
    return [EventView.from_row(event) for event in session.scalars(query)]
