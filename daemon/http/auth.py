"""Who is asking: bearer tokens (API), a signed session cookie made from the same token (pages).

A chain of small dependencies: :func:`principal` finds the caller or answers 401, and
``require_role("read" | "admin")`` (set in the route decorator) answers 403 to a read token on an
admin route. Tokens are compared by their sha256 in constant time; the server never keeps one in
clear beyond the configuration it was given. Cross-origin POSTs are refused by :class:`SameOrigin`.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.types import ASGIApp, Receive, Scope, Send

from daemon.config import Config
from daemon.config.http import ApiToken, Role, token_digest

log = logging.getLogger(__name__)

SESSION_COOKIE = "pacs_triage_session"
GENERATED_TOKEN_NAME = "admin"
_RANK = {"read": 0, "admin": 1}


@dataclass(frozen=True)
class Principal:
    """The caller: the token's name (written into audit rows) and its role."""

    name: str
    role: Role
    digest: str


class TokenFileError(Exception):
    """The token file exists but cannot be used; the message says how to fix it."""


def ensure_token_file(config: Config) -> tuple[ApiToken, Path, bool]:
    """The admin token of ``<home>/api-token`` (or ``http.token_file``), created on first use (0600).

    Returns the token, its path, and whether it was created now.
    """
    path = config.http.token_file or config.home / "api-token"
    created = False
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32) + "\n")
        created = True
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise TokenFileError(f"{path} is readable by others (mode {mode:o}): run `chmod 600 {path}`")
    value = path.read_text(encoding="utf-8").strip()
    if len(value) < 16:
        raise TokenFileError(f"{path} holds no token of at least 16 characters: delete it to get a new one")
    return ApiToken(name=GENERATED_TOKEN_NAME, role="admin", token=value), path, created


class Tokens:
    """The configured tokens, looked up by digest."""

    def __init__(self, tokens: tuple[ApiToken, ...]) -> None:
        self._by_digest = {t.digest: t for t in tokens}

    def find(self, token: str) -> Principal | None:
        return self.by_digest(token_digest(token))

    def by_digest(self, digest: str) -> Principal | None:
        for known, entry in self._by_digest.items():
            if hmac.compare_digest(known, digest):
                return Principal(name=entry.name, role=entry.role, digest=known)
        return None


def session_key(config: Config) -> bytes:
    """The key that signs page sessions: ``<home>/http-session-key`` (0600), made on first use."""
    path = config.home / "http-session-key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    return path.read_text(encoding="utf-8").strip().encode()


class Sessions:
    """Signed, timed cookies holding the token's digest (so removing a token ends its sessions)."""

    def __init__(self, key: bytes, max_age_seconds: float) -> None:
        self._serializer = URLSafeTimedSerializer(key, salt="pacs-triage-session")
        self.max_age = int(max_age_seconds)

    def dump(self, principal: Principal) -> str:
        return self._serializer.dumps({"d": principal.digest})

    def load(self, cookie: str) -> str | None:
        try:
            data = self._serializer.loads(cookie, max_age=self.max_age)
        except BadSignature:
            return None
        digest = data.get("d") if isinstance(data, dict) else None
        return digest if isinstance(digest, str) else None


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status_code=401, detail=detail, headers={"WWW-Authenticate": "Bearer"})


def optional_principal(request: Request) -> Principal | None:
    """The caller from the Authorization header, else from the session cookie; None when neither."""
    tokens: Tokens = request.app.state.tokens
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise _unauthorized("use 'Authorization: Bearer <token>'")
        found = tokens.find(value.strip())
        if found is None:
            raise _unauthorized("unknown token")
        return found
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        sessions: Sessions = request.app.state.sessions
        digest = sessions.load(cookie)
        return tokens.by_digest(digest) if digest else None
    return None


def principal(caller: Annotated[Principal | None, Depends(optional_principal)]) -> Principal:
    if caller is None:
        raise _unauthorized("a bearer token is required (see <home>/api-token)")
    return caller


def require_role(role: Role) -> Callable[[Principal], Principal]:
    """A dependency for the route decorator: the caller must hold ``role`` (admin includes read)."""

    def check(caller: Annotated[Principal, Depends(principal)]) -> Principal:
        if _RANK[caller.role] < _RANK[role]:
            raise HTTPException(
                status_code=403, detail=f"token {caller.name!r} has role {caller.role}; this needs {role}"
            )
        return caller

    check.__name__ = f"require_{role}"
    return check


CurrentPrincipal = Annotated[Principal, Depends(principal)]


def health_open(request: Request) -> None:
    """``/healthz``, ``/readyz``, ``/metrics``: open to ``http.health_open_to`` networks, else a read token."""
    config: Config = request.app.state.config
    host = request.client.host if request.client else ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None and any(address in ipaddress.ip_network(n) for n in config.http.health_open_to):
        return
    if optional_principal(request) is None:
        raise _unauthorized("health endpoints need a token from this address (see http.health_open_to)")


class SameOrigin:
    """Refuse state-changing requests whose Origin (or Referer) is another site (CSRF on form buttons).

    A request that shows an Origin (or Referer) must come from this server or ``http.allowed_origins``;
    one without either passes only when it carries no session cookie (an API client, not a browser).
    """

    SAFE = frozenset({"GET", "HEAD", "OPTIONS"})

    def __init__(self, app: ASGIApp, allowed_origins: tuple[str, ...] = ()) -> None:
        self.app = app
        self.allowed = {o.rstrip("/").lower() for o in allowed_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in self.SAFE:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        scheme = scope.get("scheme", "http")
        own = f"{scheme}://{headers.get('host', '')}".lower()
        origin = headers.get("origin")
        if origin is None and "referer" in headers:
            parts = headers["referer"].split("/")
            origin = "/".join(parts[:3]) if len(parts) >= 3 else headers["referer"]
        if origin is None and SESSION_COOKIE not in headers.get("cookie", ""):
            # Not a browser acting on a session (curl, scripts): authentication decides.
            await self.app(scope, receive, send)
            return
        if origin is not None and origin.rstrip("/").lower() in self.allowed | {own}:
            await self.app(scope, receive, send)
            return
        body = b'{"detail":"cross-origin request refused"}'
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
