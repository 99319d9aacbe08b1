"""``/api/v1/events``: the audit log, newest first."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from daemon.http.auth import require_role
from daemon.http.deps import NodeDep
from daemon.http.schemas import READ_ERRORS, Event
from storage.activity import recent_events

router = APIRouter(prefix="/api/v1/events", tags=["events"], responses=READ_ERRORS)


@router.get("", response_model=list[Event], dependencies=[Depends(require_role("read"))])
def list_events(
    node: NodeDep,
    entity: Annotated[str | None, Query(description="study, series, job, result, delivery")] = None,
    entity_id: str | None = None,
    kind: Annotated[str | None, Query(description="e.g. queued, dead, operator")] = None,
    before_id: Annotated[int | None, Query(description="page back: only events older than this id")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[Event]:
    rows = recent_events(
        node.sessions, entity=entity, entity_id=entity_id, kind=kind, before_id=before_id, limit=limit
    )
    return [Event.of(e) for e in rows]
