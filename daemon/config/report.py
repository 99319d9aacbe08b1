"""The effective configuration as flat settings, each with its source, secrets masked; and the
schema's keys (what ``deploy/pacs-triage.example.toml`` must document)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from daemon.config.sources import Key, LoadedConfig, Origin, _model_of, _union_args

MASK = "********"
# Keys whose values are secrets, whatever section they are in (HTTP tokens, passwords, keys of APIs).
_SECRET_KEY = re.compile(r"password|passwd|secret|token|api_?key|credential", re.IGNORECASE)
# The password of a URL's user information: scheme://user:PASSWORD@host
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@/\s]+(?=@)", re.IGNORECASE)


@dataclass(frozen=True)
class Setting:
    """One effective value: ``key`` dotted (``routing.rules[0].name``), secrets already masked."""

    key: str
    value: Any  # JSON-compatible
    origin: Origin


def settings(loaded: LoadedConfig) -> list[Setting]:
    """Every effective value of the configuration with its origin, in schema order."""
    data = loaded.config.model_dump(mode="json")
    return [
        Setting(_dotted(key), mask(key, value), loaded.provenance.origin(key))
        for key, value in _flatten(data)
    ]


def mask(key: Key, value: Any) -> Any:
    """``value`` with secrets replaced: values of secret-named keys, passwords inside URLs."""
    name = next((str(k) for k in reversed(key) if isinstance(k, str)), "")
    if value is not None and _SECRET_KEY.search(name):
        return [MASK for _ in value] if isinstance(value, list) else MASK
    return mask_text(value) if isinstance(value, str) else value


def mask_text(text: str) -> str:
    """``text`` with any URL password replaced (``postgresql://user:********@host/db``)."""
    return _URL_PASSWORD.sub(lambda m: m.group("head") + MASK, text)


def schema_keys(model: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """Every key of the schema, dotted; items of lists of tables without an index."""
    from daemon.config.model import Config

    keys = []
    for name, field in (model or Config).model_fields.items():
        item = _item_model(field.annotation)
        if item is not None:
            keys += schema_keys(item, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _item_model(annotation: Any) -> type[BaseModel] | None:
    """The model of a section, of an optional section, or of the items of a list of tables."""
    model = _model_of(annotation)
    if model is not None:
        return model
    for arg in _union_args(annotation):
        args = [a for a in getattr(arg, "__args__", ()) if a is not Ellipsis]
        if len(args) == 1 and _model_of(args[0]) is not None:
            return _model_of(args[0])
    return None


def _flatten(value: Any, prefix: Key = ()) -> list[tuple[Key, Any]]:
    if isinstance(value, dict) and (value or not prefix):
        return [leaf for k, v in value.items() for leaf in _flatten(v, (*prefix, k))]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [leaf for i, v in enumerate(value) for leaf in _flatten(v, (*prefix, i))]
    return [(prefix, value)]


def _dotted(key: Key) -> str:
    text = ""
    for part in key:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text
