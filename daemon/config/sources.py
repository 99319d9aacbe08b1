"""Building the ``Config`` from its sources, later wins: embedded defaults < TOML file < environment.

Both sources are explicit arguments: a path and a mapping of environment variables. Nothing here
touches ``os.environ`` except ``environment()``, which takes the one snapshot an entry point (the
CLI) passes down. Variables are ``PACS_TRIAGE_<KEY>`` for top-level keys and
``PACS_TRIAGE_<SECTION>__<KEY>`` below (``PACS_TRIAGE_WORKERS__BACKOFF__BASE_SECONDS=2``); a
list or table is given whole as JSON (``PACS_TRIAGE_ACCESS__ALLOW='[{"ae_title": ...}]'``). An
unknown ``PACS_TRIAGE_*`` variable is refused, as an unknown key in the file is: a misspelt
setting must not be silently ignored.
"""

from __future__ import annotations

import difflib
import enum
import json
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from daemon.config.base import ConfigError
from daemon.config.model import Config

ENV_PREFIX = "PACS_TRIAGE_"
ENV_NESTED_DELIMITER = "__"
# Variables with our prefix that are not configuration keys: the CLI's --config, and the test suite's.
NOT_CONFIG_VARIABLES = frozenset({"PACS_TRIAGE_CONFIG"})
NOT_CONFIG_PREFIXES = ("PACS_TRIAGE_TEST_",)

Key = tuple[str | int, ...]


class Source(enum.Enum):
    """Where an effective value came from."""

    DEFAULT = "default"  # embedded in the code
    FILE = "file"  # the TOML file
    ENVIRONMENT = "environment"  # a PACS_TRIAGE_* variable


@dataclass(frozen=True)
class Origin:
    source: Source
    detail: str | None = None  # the file's path or the variable's name


@dataclass(frozen=True)
class Provenance:
    """For every key a source set, where it was set."""

    path: Path | None
    file_keys: frozenset[Key]
    env_keys: Mapping[Key, str]  # key -> the variable that set it

    def origin(self, key: Key) -> Origin:
        """Where ``key`` (or the list or table holding it) was set; DEFAULT when nowhere."""
        for prefix in _prefixes(key):
            if prefix in self.env_keys:
                return Origin(Source.ENVIRONMENT, self.env_keys[prefix])
        if any(prefix in self.file_keys for prefix in _prefixes(key)):
            return Origin(Source.FILE, str(self.path))
        return Origin(Source.DEFAULT)

    def origins_under(self, key: Key) -> list[Origin]:
        """The origins of every key set at or under ``key`` (for errors of a whole section)."""
        found = [Origin(Source.ENVIRONMENT, v) for k, v in self.env_keys.items() if k[: len(key)] == key]
        if any(k[: len(key)] == key for k in self.file_keys):
            found.append(Origin(Source.FILE, str(self.path)))
        return found


@dataclass(frozen=True)
class LoadedConfig:
    """The configuration and where its values came from."""

    config: Config
    provenance: Provenance


def environment() -> dict[str, str]:
    """A snapshot of this process's environment: the one read of ``os.environ`` for configuration."""
    return dict(os.environ)


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Build the configuration from embedded defaults, the TOML file and the environment.

    ``environ`` is the environment to read (default: a snapshot of this process's); it is never
    written to.
    """
    return load(path, environ).config


def load(path: Path | None = None, environ: Mapping[str, str] | None = None) -> LoadedConfig:
    """As ``load_config``, keeping where each value came from (``pacs-triage config check``)."""
    data = read_file(path) if path is not None else {}
    env_data, env_keys, problems = read_environment(environment() if environ is None else environ)
    provenance = Provenance(path=path, file_keys=frozenset(_leaves(data)), env_keys=env_keys)
    try:
        config = Config.model_validate(_merge(data, env_data))
    except ValidationError as exc:
        raise ConfigError(_describe([*problems, *_error_lines(exc, provenance)])) from exc
    except ValueError as exc:  # raised by a section's model_post_init (e.g. [tls] files)
        raise ConfigError(_describe([*problems, str(exc)])) from exc
    if problems:
        raise ConfigError(_describe(problems))
    return LoadedConfig(config=config, provenance=provenance)


def read_file(path: Path) -> dict[str, Any]:
    """The TOML file as a dict; a missing or malformed file is a ``ConfigError``."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"config file {path} is a directory") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def read_environment(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[Key, str], list[str]]:
    """The ``PACS_TRIAGE_*`` variables as nested data, the key each set, and the refused ones."""
    data: dict[str, Any] = {}
    keys: dict[Key, str] = {}
    problems: list[str] = []
    # Shorter names first: a table given as JSON, then the keys set inside it.
    for name in sorted(environ, key=lambda n: (n.count(ENV_NESTED_DELIMITER), n)):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in NOT_CONFIG_VARIABLES:
            continue
        if upper.startswith(NOT_CONFIG_PREFIXES):
            continue
        parts = [p.lower() for p in upper.removeprefix(ENV_PREFIX).split(ENV_NESTED_DELIMITER)]
        if parts[0] not in Config.model_fields:
            problems.append(_unknown_variable(name, parts[0]))
            continue
        try:
            value = _env_value(name, parts, environ[name])
            _set(data, parts, value, name)
        except ValueError as exc:
            problems.append(f"{name}: {exc}")
            continue
        # A list or table given as JSON: only the keys it sets (defaults inside it stay "default").
        for leaf in _leaves(value) or [()]:
            keys[(*parts, *leaf)] = name
    return data, keys, problems


def _unknown_variable(name: str, key: str) -> str:
    known = [ENV_PREFIX + k.upper() for k in Config.model_fields]
    close = difflib.get_close_matches(name.upper().split(ENV_NESTED_DELIMITER)[0], known, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return (
        f"{name}: unknown environment variable, there is no key {key!r} ({hint}top-level keys: "
        f"{', '.join(Config.model_fields)}; sections as {ENV_PREFIX}<SECTION>__<KEY>); "
        f"unset it or fix the spelling"
    )


def _env_value(name: str, parts: list[str], raw: str) -> Any:
    """The variable's value: JSON for a list or table, else the string (pydantic converts it)."""
    model: type[BaseModel] | None = Config
    annotation: Any = None
    for i, part in enumerate(parts):
        if model is None:
            above = ENV_PREFIX + ENV_NESTED_DELIMITER.join(parts[:i]).upper()
            raise ValueError(f"{'.'.join(parts[:i])} is a list or a value: set it whole in {above}")
        field = model.model_fields.get(part)
        if field is None:
            return raw  # an unknown key: validation names it
        annotation = field.annotation
        model = _model_of(annotation)
    if not _is_structured(annotation):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{'.'.join(parts)} is a list or table: give it as JSON ({exc})") from exc


def _union_args(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    for arg in _union_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _is_structured(annotation: Any) -> bool:
    return any(
        _model_of(arg) is not None or typing.get_origin(arg) in (tuple, list, dict)
        for arg in _union_args(annotation)
    )


def _set(data: dict[str, Any], parts: list[str], value: Any, name: str) -> None:
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"conflicts with another variable setting {part!r} as a whole")
    last = parts[-1]
    if isinstance(node.get(last), dict) and isinstance(value, dict):
        node[last] = _merge(node[last], value)
    else:
        node[last] = value


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``; tables merge key by key, anything else is replaced."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _leaves(value: Any, prefix: Key = ()) -> list[Key]:
    """The keys of every value in nested data; list items that are tables count by index."""
    if isinstance(value, Mapping):
        if not value:
            return [prefix] if prefix else []
        return [leaf for k, v in value.items() for leaf in _leaves(v, (*prefix, k))]
    if isinstance(value, list | tuple) and value and all(isinstance(v, Mapping) for v in value):
        return [leaf for i, v in enumerate(value) for leaf in _leaves(v, (*prefix, i))]
    return [prefix] if prefix else []


def _prefixes(key: Key) -> list[Key]:
    return [key[:n] for n in range(len(key), 0, -1)]


def _error_lines(exc: ValidationError, provenance: Provenance) -> list[str]:
    lines = []
    for err in exc.errors():
        loc: Key = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see deploy/pacs-triage.example.toml)"
        origin = provenance.origin(loc) if loc else Origin(Source.DEFAULT)
        origins = [origin] if origin.source is not Source.DEFAULT else provenance.origins_under(loc)
        where = " and ".join(sorted({o.detail or o.source.value for o in origins}))
        lines.append(f"{key}: {msg}" + (f" [set in {where}]" if where else ""))
    return lines


def _describe(lines: list[str]) -> str:
    return "invalid configuration:\n  " + "\n  ".join(lines)
