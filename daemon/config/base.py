"""What every section shares: the frozen base model, the error type, and the small value types
(sizes, AE titles, names, ``AET@HOST:PORT`` peers) that sections validate with."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from vocabulary import validate_ae_title

DEFAULT_AE_TITLE = "PACS_TRIAGE"
DEFAULT_PORT = 11112
DEFAULT_TLS_PORT = 2762  # IANA "dicom-tls"

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


class ConfigError(Exception):
    """The configuration is invalid; the message names the key. The CLI exits with code 2."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _parse_size(value: Any) -> Any:
    if isinstance(value, str):
        match = _SIZE.match(value)
        if not match:
            raise ValueError(f"{value!r} is not a size (examples: 1048576, '512MiB', '2GB')")
        unit = (match.group(2) or "B").lower()
        return int(float(match.group(1)) * _UNITS[unit])
    return value


ByteSize = Annotated[int, BeforeValidator(_parse_size), Field(ge=0)]


AETitle = Annotated[str, BeforeValidator(lambda v: validate_ae_title(str(v)))]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(
            f"{value!r} must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return value


Name = Annotated[str, AfterValidator(_name)]


def _regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"{value!r} is not a valid regular expression: {exc}") from exc
    return value


Regex = Annotated[str, AfterValidator(_regex)]  # a regular expression, compiled once to check it


def parse_peer(text: str) -> tuple[str, str, int]:
    """Parse ``AET@HOST:PORT`` (HOST may be ``[v6]``) into its parts, validating each."""
    match = re.fullmatch(r"(?P<ae>[^@]+)@(?P<host>\[[^\]]+\]|[^:\[\]]+):(?P<port>\d{1,5})", text.strip())
    if not match:
        raise ValueError(f"{text!r} is not AET@HOST:PORT")
    port = int(match.group("port"))
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} out of range 1-65535")
    return validate_ae_title(match.group("ae")), match.group("host").strip("[]"), port
