"""The pages: dashboard, worklist by triage priority, study timeline, failures; login with the API token.

Server-rendered Jinja2, no build step. Buttons POST to the admin API routes with a few lines of
vanilla JavaScript (``static/actions.js``) and reload; the same-origin check guards them.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from daemon.http.auth import SESSION_COOKIE, Principal, Sessions, Tokens, optional_principal
from daemon.http.deps import NodeDep, Now
from daemon.http.studies import stages, study_filter
from daemon.service.health import readiness
from storage.activity import throughput
from storage.models import DeliveryState, JobState
from storage.outbox import Outbox
from storage.queue import JobQueue
from storage.stats import queue_summary
from storage.studies import StudyFilter, study_detail, worklist

TEMPLATES = Jinja2Templates(directory=Path(__file__).resolve().parent / "templates")
router = APIRouter(include_in_schema=False)
Caller = Annotated[Principal | None, Depends(optional_principal)]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _when(value: dt.datetime | None) -> str:
    return "–" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def _bytes(value: int | None) -> str:
    if value is None:
        return "–"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value} B"


TEMPLATES.env.filters.update(duration=_duration, when=_when, bytes=_bytes)


def _login(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={quote(target)}", status_code=303)


def _page(request: Request, name: str, caller: Principal, **context: Any) -> HTMLResponse:
    return TEMPLATES.TemplateResponse(
        request, name, {"caller": caller, "admin": caller.role == "admin", **context}
    )


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "/", error: str | None = None) -> HTMLResponse:
    return TEMPLATES.TemplateResponse(request, "login.html", {"next": next, "error": error, "caller": None})


@router.post("/login")
def login(request: Request, token: Annotated[str, Form()], next: Annotated[str, Form()] = "/") -> Response:
    tokens: Tokens = request.app.state.tokens
    sessions: Sessions = request.app.state.sessions
    caller = tokens.find(token.strip())
    if caller is None:
        return TEMPLATES.TemplateResponse(
            request, "login.html", {"next": next, "error": "unknown token", "caller": None}, status_code=401
        )
    safe_next = next if next.startswith("/") and not next.startswith("//") else "/"
    response = RedirectResponse(safe_next, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        sessions.dump(caller),
        max_age=sessions.max_age,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout")
def logout() -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE)
    return response


@router.get("/", response_class=HTMLResponse)
def dashboard(request: Request, node: NodeDep, now: Now, caller: Caller) -> Response:
    if caller is None:
        return _login(request)
    return _page(
        request,
        "dashboard.html",
        caller,
        title="Dashboard",
        ready=readiness(node.config, node.engine, node.sessions, node.spool, now=now),
        hour=throughput(node.sessions, now=now, window=dt.timedelta(hours=1)),
        day=throughput(node.sessions, now=now, window=dt.timedelta(days=1)),
        queue=queue_summary(node.sessions, now, limit=5),
        free_bytes=node.spool.free_bytes(),
    )


def _worklist_filter(request: Request) -> StudyFilter:
    """The filter form's fields; a field left empty ("any") filters nothing."""
    query = {k: v for k, v in request.query_params.items() if v.strip()}
    priority = query.get("priority")
    if priority not in (None, "stat", "urgent", "routine"):
        raise HTTPException(400, f"unknown priority {priority!r}")
    try:
        date = dt.date.fromisoformat(query["date"]) if "date" in query else None
    except ValueError as exc:
        raise HTTPException(400, f"date {query['date']!r} is not YYYY-MM-DD") from exc
    return study_filter(
        date=date,
        priority=[priority] if priority else None,  # type: ignore[list-item]
        pipeline=query.get("pipeline"),
    )


@router.get("/worklist", response_class=HTMLResponse)
def worklist_page(request: Request, node: NodeDep, caller: Caller) -> Response:
    if caller is None:
        return _login(request)
    flt = _worklist_filter(request)
    return _page(request, "worklist.html", caller, title="Worklist", studies=worklist(node.sessions, flt))


@router.get("/studies/{study_id}", response_class=HTMLResponse)
def study_page(request: Request, study_id: int, node: NodeDep, caller: Caller) -> Response:
    if caller is None:
        return _login(request)
    detail = study_detail(node.sessions, study_id)
    return _page(
        request, "study.html", caller, title=f"Study {study_id}", d=detail, stages=stages(node, detail)
    )


@router.get("/failures", response_class=HTMLResponse)
def failures_page(request: Request, node: NodeDep, now: Now, caller: Caller) -> Response:
    if caller is None:
        return _login(request)
    jobs = JobQueue(node.sessions).recent([JobState.DEAD, JobState.FAILED, JobState.CANCELLED], 200)
    deliveries = Outbox(node.sessions).recent([DeliveryState.DEAD, DeliveryState.CANCELLED], 200)
    return _page(
        request,
        "failures.html",
        caller,
        title="Failures",
        jobs=jobs,
        deliveries=deliveries,
        queue=queue_summary(node.sessions, now, limit=50),
    )
