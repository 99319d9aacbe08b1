"""The root of the tree: ``Config``, the node's top-level keys, and the small sections that go
with them (storage, logging). Built by ``daemon.config.sources.load_config``; never from the
environment by itself."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import ConfigDict, Field, field_validator, model_validator

from daemon.config.base import DEFAULT_AE_TITLE, DEFAULT_PORT, AETitle, ByteSize, _Section, parse_peer
from daemon.config.delivery import (
    DEFAULT_DESTINATION_NAME,
    Content,
    DestinationConfig,
    DispatchConfig,
    RetentionConfig,
    check_contents,
)
from daemon.config.dicom import AccessConfig, DicomConfig, TlsConfig
from daemon.config.http import HttpConfig
from daemon.config.logs import LoggingConfig
from daemon.config.pipelines import PipelinesConfig
from daemon.config.queue import CompletionConfig, WorkersConfig
from daemon.config.routing import RoutingConfig


class StorageConfig(_Section):
    """Where bytes and records go."""

    spool_dir: Path | None = None  # default: <home>/spool
    min_free_bytes: ByteSize = 1 * 2**30  # refuse stores (A700) below this much free space


DATABASE_URL_FORMS = "sqlite:////absolute/path/pacs-triage.db or postgresql://USER:PASSWORD@HOST:5432/DBNAME"


def _check_database_url(value: str) -> None:
    """Parse it as the engine will, so a malformed URL is a configuration error, not a traceback.

    The value itself is not repeated in the message: it may hold a password.
    """
    from sqlalchemy import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(value)
        url.port  # noqa: B018 - parsing the port is the check
    except (ArgumentError, ValueError) as exc:
        raise ValueError(f"not a valid database URL ({exc}); use {DATABASE_URL_FORMS}") from None
    if url.get_backend_name() == "sqlite" and url.host:
        raise ValueError(
            f"a SQLite URL has no host part (it has {url.host!r}): three slashes before a relative path, "
            f"four before an absolute one; use {DATABASE_URL_FORMS}"
        )


def default_home() -> Path:
    return Path.home() / ".local" / "share" / "pacs-triage"


class Config(_Section):
    """The whole configuration of a pacs-triage node."""

    # validate_default: the default_factory of ``home`` is checked like a given value.
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    home: Path = Field(default_factory=default_home)  # data directory (PACS_TRIAGE_HOME)
    ae_title: AETitle = DEFAULT_AE_TITLE
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)  # 0: any free port (tests)
    database_url: str | None = None  # default: sqlite:///<home>/pacs-triage.db
    destination: str | None = None  # AET@HOST:PORT where results go

    dicom: DicomConfig = DicomConfig()
    access: AccessConfig = AccessConfig()
    tls: TlsConfig = TlsConfig()
    storage: StorageConfig = StorageConfig()
    logging: LoggingConfig = LoggingConfig()
    completion: CompletionConfig = CompletionConfig()
    routing: RoutingConfig = RoutingConfig()
    workers: WorkersConfig = WorkersConfig()
    destinations: tuple[DestinationConfig, ...] = ()
    dispatch: DispatchConfig = DispatchConfig()
    retention: RetentionConfig = RetentionConfig()
    pipelines: PipelinesConfig = PipelinesConfig()
    http: HttpConfig = HttpConfig()

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^(sqlite|postgres(ql)?)(\+\w+)?://", value):
            raise ValueError("must start with sqlite:// or postgresql://")
        if value is not None:
            _check_database_url(value)
        return value

    @field_validator("destination")
    @classmethod
    def _destination(cls, value: str | None) -> str | None:
        if value is not None:
            parse_peer(value)
        return value

    @model_validator(mode="after")
    def _destination_names(self) -> Config:
        names = [d.name for d in self.all_destinations]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"destinations: names must be unique; repeated: {', '.join(repeated)}")
        kinds = {d.name: d.kind for d in self.all_destinations}
        for rule in self.routing.rules:
            unknown = [d for d in (*rule.destinations, *(s.destination for s in rule.send)) if d not in names]
            if unknown:
                raise ValueError(
                    f"routing.rules {rule.name!r}: unknown destination(s) {', '.join(unknown)}; "
                    f"configured: {', '.join(names) or 'none'}"
                )
            for send in rule.send:
                check_contents(
                    kinds[send.destination],
                    send.receives,
                    f"routing.rules {rule.name!r} send {send.destination!r}",
                )
        return self

    @property
    def all_destinations(self) -> tuple[DestinationConfig, ...]:
        """``[[destinations]]`` plus the one ``destination = "AET@HOST:PORT"`` names (as "default")."""
        if self.destination is None:
            return self.destinations
        ae, host, port = parse_peer(self.destination)
        return (
            *self.destinations,
            DestinationConfig(name=DEFAULT_DESTINATION_NAME, ae_title=ae, host=host, port=port),
        )

    def destinations_for(self, rule_name: str | None) -> tuple[DestinationConfig, ...]:
        """Where results of a job routed by ``rule_name`` go: the rule's list, else every destination."""
        rule = self.routing.rule(rule_name)
        if rule is None or not rule.destinations:
            return self.all_destinations
        return tuple(d for d in self.all_destinations if d.name in rule.destinations)

    def deliveries_for(
        self, rule_name: str | None
    ) -> tuple[tuple[DestinationConfig, tuple[Content, ...]], ...]:
        """Each destination of a job routed by ``rule_name`` with what it receives from that rule."""
        rule = self.routing.rule(rule_name)
        return tuple(
            (d, (rule.receives(d.name) if rule is not None else None) or d.contents)
            for d in self.destinations_for(rule_name)
        )

    @property
    def spool_dir(self) -> Path:
        return self.storage.spool_dir or self.home / "spool"

    @property
    def results_dir(self) -> Path:
        """Where workers keep result objects until retention (apart from received instances)."""
        return self.spool_dir / "results"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'pacs-triage.db'}"
