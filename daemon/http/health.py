"""``/healthz`` (the process answers; touches nothing) and ``/readyz`` (every component, 200 or 503)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from daemon.http.auth import health_open
from daemon.http.deps import NodeDep, Now
from daemon.http.schemas import Health, ReadinessOut
from daemon.service.health import readiness

router = APIRouter(tags=["health"], dependencies=[Depends(health_open)])


@router.get("/healthz", response_model=Health, summary="The process is alive")
def healthz() -> Health:
    return Health(status="alive")


@router.get(
    "/readyz",
    response_model=ReadinessOut,
    responses={503: {"model": ReadinessOut, "description": "a component is not ready"}},
    summary="Ready to receive, store, analyse and deliver",
)
def readyz(node: NodeDep, now: Now) -> JSONResponse:
    result = ReadinessOut.of(readiness(node.config, node.engine, node.sessions, node.spool, now=now))
    return JSONResponse(result.model_dump(mode="json"), status_code=200 if result.ready else 503)
