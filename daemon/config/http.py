"""``[http]``: the HTTP API, the pages and the health endpoints that ``serve`` runs beside DICOM."""

from __future__ import annotations

import hashlib
import ipaddress
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from daemon.config.base import Name, _Section

DEFAULT_LISTEN = "127.0.0.1:8080"
_LISTEN = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[0-9.]+):(?P<port>\d{1,5})")
MIN_TOKEN_CHARS = 16
Role = Literal["read", "admin"]


def token_digest(token: str) -> str:
    """How a token is kept in a config file or compared: its sha256, 64 lower-case hex digits."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class ApiToken(_Section):
    """A named bearer token with a role; give the token itself or only its sha256 (preferred in files)."""

    name: Name  # written into every audit row of a change made with this token
    role: Role = "read"  # read: GET only; admin: also retry, cancel, re-run, send now
    token: SecretStr | None = None
    token_sha256: str | None = None  # `printf %s "$TOKEN" | sha256sum`

    @field_validator("token")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_TOKEN_CHARS:
            raise ValueError(
                f"a token must be at least {MIN_TOKEN_CHARS} characters (use `openssl rand -hex 32`)"
            )
        return value

    @field_validator("token_sha256")
    @classmethod
    def _hex(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", value.strip()):
            raise ValueError(f"{value!r} is not a sha256 (64 hex digits)")
        return None if value is None else value.strip().lower()

    @model_validator(mode="after")
    def _one_of(self) -> ApiToken:
        if (self.token is None) == (self.token_sha256 is None):
            raise ValueError(f"http.tokens {self.name!r}: give exactly one of token or token_sha256")
        return self

    @property
    def digest(self) -> str:
        if self.token is not None:
            return token_digest(self.token.get_secret_value())
        assert self.token_sha256 is not None
        return self.token_sha256


class HttpConfig(_Section):
    """The HTTP server inside ``serve``: REST API (/api/v1, OpenAPI at /docs), pages, /healthz, /readyz.

    Without ``[[http.tokens]]``, ``serve`` creates an admin token named ``admin`` on first start in
    ``token_file`` (default ``<home>/api-token``, mode 0600) and logs where it is.
    """

    enabled: bool = True
    listen: str = DEFAULT_LISTEN  # HOST:PORT, [V6]:PORT; port 0 picks a free one (tests)
    certificate: Path | None = None  # serve HTTPS with this certificate chain (PEM) ...
    private_key: Path | None = None  # ... and its key
    tokens: tuple[ApiToken, ...] = ()
    token_file: Path | None = None  # default: <home>/api-token
    session_hours: float = Field(default=12.0, gt=0)  # page logins last this long
    # Clients from these networks reach /healthz, /readyz and /metrics without a token; empty: always
    # ask for one (a read token is enough).
    health_open_to: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    # Origins (scheme://host:port) besides the server's own from which browsers may POST.
    allowed_origins: tuple[str, ...] = ()
    heartbeat_stale_seconds: float = Field(default=30.0, gt=0)  # a component silent this long is not ready

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        match = _LISTEN.fullmatch(value.strip())
        if not match:
            raise ValueError(f"{value!r} is not HOST:PORT with HOST an IP address (e.g. 127.0.0.1:8080)")
        ipaddress.ip_address(match.group("host").strip("[]"))
        if not 0 <= int(match.group("port")) <= 65535:
            raise ValueError(f"port {match.group('port')} out of range 0-65535")
        return value.strip()

    @field_validator("health_open_to")
    @classmethod
    def _networks(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(str(ipaddress.ip_network(v, strict=False)) for v in values)

    @model_validator(mode="after")
    def _checks(self) -> HttpConfig:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("http.certificate and http.private_key go together: give both or neither")
        for key in ("certificate", "private_key"):
            path = getattr(self, key)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"http.{key}: file {path} does not exist")
        names = [t.name for t in self.tokens]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"http.tokens: names must be unique; repeated: {', '.join(repeated)}")
        return self

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])
