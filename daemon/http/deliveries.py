"""``/api/v1/deliveries``: results on their way to destinations; retry, send now, cancel.

A retry or "send now" only resets the outbox row; the dispatcher does the sending.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from daemon.http.auth import Principal, require_role
from daemon.http.deps import NodeDep, Now
from daemon.http.schemas import ADMIN_ERRORS, Delivery, DeliveryAction
from storage import operations
from storage.models import DeliveryState
from storage.outbox import Outbox

router = APIRouter(prefix="/api/v1/deliveries", tags=["deliveries"], responses=ADMIN_ERRORS)
Admin = Annotated[Principal, Depends(require_role("admin"))]


@router.get("", response_model=list[Delivery], dependencies=[Depends(require_role("read"))])
def list_deliveries(
    node: NodeDep,
    state: Annotated[list[DeliveryState] | None, Query(description="delivery state (repeatable)")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[Delivery]:
    return [Delivery.of(d) for d in Outbox(node.sessions).recent(list(state or ()), limit)]


@router.post(
    "/{delivery_id}/retry", response_model=DeliveryAction, summary="Send a dead or cancelled delivery again"
)
def retry_delivery(delivery_id: int, node: NodeDep, now: Now, caller: Admin) -> DeliveryAction:
    return DeliveryAction.of(operations.retry_delivery(node.sessions, delivery_id, by=caller.name, now=now))


@router.post(
    "/{delivery_id}/send-now", response_model=DeliveryAction, summary="Send without waiting for the backoff"
)
def send_now(delivery_id: int, node: NodeDep, now: Now, caller: Admin) -> DeliveryAction:
    return DeliveryAction.of(operations.send_now(node.sessions, delivery_id, by=caller.name, now=now))


@router.post("/{delivery_id}/cancel", response_model=DeliveryAction, summary="Stop trying to send")
def cancel_delivery(delivery_id: int, node: NodeDep, now: Now, caller: Admin) -> DeliveryAction:
    return DeliveryAction.of(operations.cancel_delivery(node.sessions, delivery_id, by=caller.name, now=now))
