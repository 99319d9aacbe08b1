"""The FastAPI application: one router per resource, the pages, and the error mapping.

``create_app`` is given the node's storage and the tokens; it starts nothing. ``daemon/http/server.py``
runs it under uvicorn inside ``serve``.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from daemon.http import deliveries, events, health, jobs, pages, studies
from daemon.http.auth import SameOrigin, Sessions, Tokens
from daemon.service.node import Node
from storage.errors import InvalidTransition, NotFound, StorageUnavailable

STATIC = Path(__file__).resolve().parent / "static"
# /metrics (Prometheus) lives in daemon/http/metrics.py when present: a module-level ``router``.
METRICS_MODULE = "daemon.http.metrics"


def _error(status: int) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    """A handler answering ``status`` with the error's message (it says what to do)."""

    async def handler(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status)

    return handler


def create_app(node: Node, tokens: Tokens, sessions: Sessions) -> FastAPI:
    app = FastAPI(
        title="pacs-triage",
        version="1",
        summary="Studies received, jobs, deliveries and health of one pacs-triage node.",
        description=(
            "Authenticate with `Authorization: Bearer <token>` (the token is in `<home>/api-token` "
            "unless `[[http.tokens]]` are configured). Read tokens may GET; admin tokens may also "
            "POST the actions, each idempotent and written to the audit log with the token's name."
        ),
    )
    app.state.node = node
    app.state.config = node.config
    app.state.tokens = tokens
    app.state.sessions = sessions
    app.add_exception_handler(NotFound, _error(404))
    app.add_exception_handler(InvalidTransition, _error(409))
    app.add_exception_handler(StorageUnavailable, _error(503))
    app.add_middleware(SameOrigin, allowed_origins=node.config.http.allowed_origins)
    app.include_router(health.router)
    if importlib.util.find_spec(METRICS_MODULE) is not None:
        app.include_router(importlib.import_module(METRICS_MODULE).router)
    for module in (studies, jobs, deliveries, events):
        app.include_router(module.router)
    app.include_router(jobs.dead_router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
