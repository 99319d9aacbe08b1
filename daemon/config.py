"""One typed, validated configuration object, built once at start-up and passed explicitly.

Sources, later wins: embedded defaults < TOML file (``--config``) < environment variables.
Environment variables are ``PACS_TRIAGE_<KEY>`` for top-level keys (``PACS_TRIAGE_HOME``,
``PACS_TRIAGE_PORT``, ``PACS_TRIAGE_AE_TITLE``, ``PACS_TRIAGE_DATABASE_URL``,
``PACS_TRIAGE_DESTINATION``) and ``PACS_TRIAGE_<SECTION>__<KEY>`` for sections
(e.g. ``PACS_TRIAGE_DICOM__MAX_ASSOCIATIONS=32``). This is the only module that reads the
environment.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from storage.models import JobPriority
from storage.retry import Backoff

ENV_PREFIX = "PACS_TRIAGE_"
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


def _parse_size(value: Any) -> Any:
    if isinstance(value, str):
        match = _SIZE.match(value)
        if not match:
            raise ValueError(f"{value!r} is not a size (examples: 1048576, '512MiB', '2GB')")
        unit = (match.group(2) or "B").lower()
        return int(float(match.group(1)) * _UNITS[unit])
    return value


ByteSize = Annotated[int, BeforeValidator(_parse_size), Field(ge=0)]


def validate_ae_title(value: str) -> str:
    """PS3.5 6.2: AE is 1-16 characters of the default repertoire, no backslash or control characters."""
    title = value.strip()
    if not 1 <= len(title) <= 16:
        raise ValueError(f"AE title {value!r} must be 1 to 16 characters")
    if any(c == "\\" or not (0x20 <= ord(c) < 0x7F) for c in title):
        raise ValueError(f"AE title {value!r} may only contain printable ASCII other than backslash")
    return title


AETitle = Annotated[str, BeforeValidator(lambda v: validate_ae_title(str(v)))]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DicomConfig(_Section):
    """DICOM network settings of the receiver."""

    bind_address: str = "0.0.0.0"  # listen everywhere; [access] decides who may associate
    max_associations: int = Field(default=16, ge=1, le=1000)
    # 0 = no limit: fewer, larger reads; +15-28 % on 0.5 MB CT slices (shared/notes).
    max_pdu_size: int = Field(default=0, ge=0)
    acse_timeout: float = Field(default=30.0, gt=0)
    dimse_timeout: float = Field(default=60.0, gt=0)
    network_timeout: float = Field(default=120.0, gt=0)
    # Receiver processes sharing the port (SO_REUSEPORT), each with its own GIL and database
    # connection; 1 = receive in the serve process itself. See daemon/service/receivers.py.
    receivers: int = Field(default=1, ge=1, le=64)

    @field_validator("bind_address")
    @classmethod
    def _address(cls, value: str) -> str:
        ipaddress.ip_address(value)
        return value


class AllowEntry(_Section):
    """A peer allowed to associate: its calling AE title and the network it connects from."""

    ae_title: AETitle
    network: str  # CIDR, e.g. "10.20.0.0/16" or a single address

    @field_validator("network")
    @classmethod
    def _network(cls, value: str) -> str:
        return str(ipaddress.ip_network(value, strict=False))


class AccessConfig(_Section):
    """Who may associate. Loopback peers are always allowed when ``allow_loopback`` is true."""

    allow_loopback: bool = True
    check_called_ae: bool = True  # reject associations addressed to another AE title
    allow: tuple[AllowEntry, ...] = ()


class TlsConfig(_Section):
    """DICOM TLS (PS3.15 B.1) on its own port, next to the plain port."""

    enabled: bool = False
    port: int = Field(default=DEFAULT_TLS_PORT, ge=0, le=65535)
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None  # CA bundle for verifying client certificates
    require_client_certificate: bool = True

    def model_post_init(self, _context: Any) -> None:
        if not self.enabled:
            return
        for key in ("certificate", "private_key"):
            path = getattr(self, key)
            if path is None:
                raise ValueError(f"tls.{key} is required when tls.enabled is true")
            if not Path(path).is_file():
                raise ValueError(f"tls.{key}: file {path} does not exist")
        if self.require_client_certificate and (
            self.ca_certificates is None or not Path(self.ca_certificates).is_file()
        ):
            raise ValueError(
                "tls.ca_certificates must name an existing CA file when tls.require_client_certificate is true"
            )


class StorageConfig(_Section):
    """Where bytes and records go."""

    spool_dir: Path | None = None  # default: <home>/spool
    min_free_bytes: ByteSize = 1 * 2**30  # refuse stores (A700) below this much free space


class LoggingConfig(_Section):
    level: str = "INFO"

    @field_validator("level")
    @classmethod
    def _level(cls, value: str) -> str:
        upper = value.upper()
        if upper not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
        return upper


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
PriorityName = Literal["stat", "urgent", "routine"]
DEFAULT_DESTINATION_NAME = "default"  # the name PACS_TRIAGE_DESTINATION's destination gets


def _name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(
            f"{value!r} must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return value


Name = Annotated[str, AfterValidator(_name)]


class BackoffConfig(_Section):
    """Exponential backoff with jitter: ``base * factor**(n-1)`` seconds after n failures, capped."""

    base_seconds: float = Field(default=5.0, ge=0)
    factor: float = Field(default=2.0, ge=1)
    max_seconds: float = Field(default=600.0, ge=0)
    jitter: float = Field(default=0.25, ge=0, le=1)  # +/- this fraction, spreads simultaneous retries

    @model_validator(mode="after")
    def _cap(self) -> BackoffConfig:
        if self.max_seconds < self.base_seconds:
            raise ValueError(
                f"max_seconds ({self.max_seconds}) must be >= base_seconds ({self.base_seconds})"
            )
        return self

    def policy(self) -> Backoff:
        return Backoff(
            base_seconds=self.base_seconds,
            factor=self.factor,
            max_seconds=self.max_seconds,
            jitter=self.jitter,
        )


class CompletionConfig(_Section):
    """When a study counts as complete (seconds): released + quiet period, or the idle timeout."""

    quiet_seconds: float = Field(default=10.0, ge=0)  # after the delivering associations were released
    idle_timeout_seconds: float = Field(default=60.0, gt=0)  # no instance for this long, no release needed
    sweep_interval_seconds: float = Field(default=1.0, gt=0)  # how often the scheduler looks

    @model_validator(mode="after")
    def _order(self) -> CompletionConfig:
        if self.quiet_seconds > self.idle_timeout_seconds:
            raise ValueError(
                f"quiet_seconds ({self.quiet_seconds}) must not exceed idle_timeout_seconds "
                f"({self.idle_timeout_seconds})"
            )
        return self


class RouteRule(_Section):
    """A study matches when one of its series matches every criterion given (criteria left out match all).

    Rules are tried in order; the first match routes the study to ``pipeline`` at ``priority``.
    """

    name: Name
    pipeline: Name
    priority: PriorityName = "routine"
    destinations: tuple[Name, ...] = ()  # destination names; empty: every configured destination
    modality: tuple[str, ...] = ()  # any of these (e.g. ["CT"])
    body_part: tuple[str, ...] = ()  # BodyPartExamined, any of these (e.g. ["CHEST", "ABDOMEN"])
    series_description: str | None = None  # regular expression searched in SeriesDescription
    image_type: tuple[str, ...] = ()  # every value must be in ImageType (e.g. ["ORIGINAL", "PRIMARY"])
    min_slices: int | None = Field(default=None, ge=1)
    max_slices: int | None = Field(default=None, ge=1)
    min_slice_thickness: float | None = Field(default=None, ge=0)  # mm
    max_slice_thickness: float | None = Field(default=None, ge=0)  # mm
    calling_ae: tuple[AETitle, ...] = ()  # the series came from one of these AE titles

    @field_validator("modality", "body_part", "image_type")
    @classmethod
    def _upper(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(v.strip().upper() for v in values)

    @field_validator("series_description")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"{value!r} is not a valid regular expression: {exc}") from exc
        return value

    @model_validator(mode="after")
    def _ranges(self) -> RouteRule:
        for low, high in (("min_slices", "max_slices"), ("min_slice_thickness", "max_slice_thickness")):
            lo, hi = getattr(self, low), getattr(self, high)
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"rule {self.name!r}: {low} ({lo}) is greater than {high} ({hi})")
        return self

    @property
    def job_priority(self) -> JobPriority:
        return JobPriority[self.priority.upper()]


class RoutingConfig(_Section):
    """Routing rules, tried in order. The embedded default sends every study to the ``echo`` stand-in."""

    rules: tuple[RouteRule, ...] = (RouteRule(name="default", pipeline="echo"),)

    @model_validator(mode="after")
    def _unique(self) -> RoutingConfig:
        names = [r.name for r in self.rules]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"rule names must be unique; repeated: {', '.join(duplicates)}")
        return self

    def rule(self, name: str | None) -> RouteRule | None:
        return next((r for r in self.rules if r.name == name), None)


class WorkersConfig(_Section):
    """Analysis workers: ``serve`` starts ``count`` processes (``serve --workers N`` overrides)."""

    count: int = Field(default=1, ge=0, le=64)
    lease_seconds: float = Field(default=60.0, gt=0)  # requeued when its worker stops heartbeating
    heartbeat_seconds: float | None = Field(default=None, gt=0)  # default: a third of lease_seconds
    poll_seconds: float = Field(default=1.0, gt=0)  # idle workers look for work this often
    max_attempts: int = Field(default=5, ge=1)  # transient failures, then the job is dead
    shutdown_grace_seconds: float = Field(default=30.0, ge=0)  # SIGTERM: finish, else give back
    reap_interval_seconds: float = Field(default=5.0, gt=0)
    backoff: BackoffConfig = BackoffConfig()

    @model_validator(mode="after")
    def _heartbeat(self) -> WorkersConfig:
        if self.heartbeat_seconds is not None and self.heartbeat_seconds >= self.lease_seconds:
            raise ValueError(
                f"heartbeat_seconds ({self.heartbeat_seconds}) must be shorter than lease_seconds "
                f"({self.lease_seconds}) or every lease expires"
            )
        return self

    @property
    def heartbeat_interval(self) -> float:
        return self.heartbeat_seconds or self.lease_seconds / 3


class DestinationConfig(_Section):
    """A DICOM peer that receives results (C-STORE)."""

    name: Name
    ae_title: AETitle
    host: str = Field(min_length=1, max_length=253)
    port: int = Field(ge=1, le=65535)
    tls: bool = False
    ca_certificates: Path | None = None  # trust this CA for the peer's certificate (default: system CAs)
    certificate: Path | None = None  # our client certificate, when the peer wants one
    private_key: Path | None = None
    timeout_seconds: float = Field(default=30.0, gt=0)  # connection, ACSE and DIMSE timeouts

    @property
    def peer(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


class DispatchConfig(_Section):
    """Sending results: retries with backoff, then ``dead`` (visible in ``status``, retryable by hand)."""

    threads: int = Field(default=2, ge=0, le=32)  # senders in ``serve``; 0: this node sends nothing
    poll_seconds: float = Field(default=1.0, gt=0)
    max_attempts: int = Field(default=10, ge=1)
    lease_seconds: float = Field(default=300.0, gt=0)  # must exceed a send's timeouts
    reap_interval_seconds: float = Field(default=10.0, gt=0)
    backoff: BackoffConfig = BackoffConfig(base_seconds=10.0, max_seconds=900.0)


class RetentionConfig(_Section):
    """Removing spool files of studies whose results were all delivered long enough ago."""

    delete_after_days: float | None = Field(default=None, gt=0)  # None: keep everything
    interval_seconds: float = Field(default=3600.0, gt=0)


_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
Orientation = Literal["axial", "coronal", "sagittal", "oblique"]
BUILTIN_PIPELINES = ("echo", "noop", "demo")  # names a [[pipelines.monai]] entry may not take


class BundleConfig(_Section):
    """A MONAI Model Zoo bundle directory, pinned by the sha256 of its contents."""

    path: Path
    # pipeline.bundle_runtime.bundle_sha256 of the directory: `python -c "from pipeline.bundle_runtime
    # import bundle_sha256; print(bundle_sha256('DIR'))"`. A bundle is code: it is never loaded unpinned.
    sha256: str
    # Values for ids of inference.json, e.g. {"inferer#sw_batch_size" = 1}; part of the pipeline's identity.
    overrides: dict[str, Any] = Field(default_factory=dict)

    @field_validator("sha256")
    @classmethod
    def _sha256(cls, value: str) -> str:
        if not _SHA256.match(value.strip()):
            raise ValueError(f"{value!r} is not a sha256 (64 hex digits)")
        return value.strip().lower()


class ThresholdsConfig(_Section):
    """When findings make a study URGENT or CRITICAL; a threshold left out never fires."""

    urgent_volume_ml: float | None = Field(default=None, ge=0)
    critical_volume_ml: float | None = Field(default=None, ge=0)
    urgent_probability: float | None = Field(default=None, ge=0, le=1)
    critical_probability: float | None = Field(default=None, ge=0, le=1)
    labels: tuple[str, ...] = ()  # labels/classes that count; empty: every non-background one


class MonaiPipelineConfig(_Section):
    """A named MONAI pipeline: which series it takes, the pinned bundles it runs, how it triages.

    Routing rules name it by ``name``. Everything that can change a result is part of the result
    UIDs (pipeline.spec.PipelineSpec.identity): change a threshold and the next report is a new one.
    """

    name: Name
    version: str = Field(default="1", min_length=1, max_length=16)  # bump when you change the pipeline
    segmentation: BundleConfig
    classification: BundleConfig | None = None
    allowed_dirs: tuple[Path, ...] = Field(min_length=1)  # bundles load only from inside these
    modalities: tuple[str, ...] = ("CT",)
    orientations: tuple[Orientation, ...] = ("axial",)
    min_slices: int = Field(default=16, ge=1)
    min_slice_thickness: float = Field(default=0.0, ge=0)  # mm
    max_slice_thickness: float | None = Field(default=None, ge=0)  # mm; None: no upper limit
    require_original_primary: bool = False
    thresholds: ThresholdsConfig = ThresholdsConfig()
    make_seg: bool = True  # also send a DICOM SEG when something was segmented
    volume_method: Literal["voxel count", "probability sum"] | None = None  # None: the bundle's best
    device: str | None = None  # "cpu", "cuda", "cuda:1"; None: CUDA when present, else CPU
    amp: bool = True  # mixed precision on CUDA

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        if not values:
            raise ValueError("at least one Modality, e.g. ['CT']")
        return tuple(v.strip().upper() for v in values)

    @model_validator(mode="after")
    def _checks(self) -> MonaiPipelineConfig:
        if self.name in BUILTIN_PIPELINES:
            raise ValueError(f"pipeline name {self.name!r} is built in; choose another")
        if self.max_slice_thickness is not None and self.max_slice_thickness < self.min_slice_thickness:
            raise ValueError(
                f"pipeline {self.name!r}: max_slice_thickness ({self.max_slice_thickness}) is below "
                f"min_slice_thickness ({self.min_slice_thickness})"
            )
        return self


class PipelinesConfig(_Section):
    """Analysis pipelines: the built-in ones (echo, noop, demo) and named MONAI pipelines."""

    echo_delay_seconds: float = Field(default=0.0, ge=0)  # the echo pipeline waits this long (demos, tests)
    # The "demo" pipeline: the phantom-trained bundles shipped in pipeline/demo/bundles (default), or a
    # directory laid out the same way (lesion_seg/, lesion_cls/, PINS.json).
    demo_bundle_dir: Path | None = None
    demo_device: str | None = None  # as MonaiPipelineConfig.device
    monai: tuple[MonaiPipelineConfig, ...] = ()  # [[pipelines.monai]] entries

    @model_validator(mode="after")
    def _unique(self) -> PipelinesConfig:
        names = [p.name for p in self.monai]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"pipelines.monai: names must be unique; repeated: {', '.join(repeated)}")
        return self


def default_home() -> Path:
    return Path.home() / ".local" / "share" / "pacs-triage"


class Config(BaseSettings):
    """The whole configuration of a pacs-triage node."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", frozen=True, extra="forbid", case_sensitive=False
    )

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

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init kwargs; the environment overrides it.
        return (env_settings, init_settings)

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^(sqlite|postgres(ql)?)(\+\w+)?://", value):
            raise ValueError("must start with sqlite:// or postgresql://")
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
        for rule in self.routing.rules:
            unknown = [d for d in rule.destinations if d not in names]
            if unknown:
                raise ValueError(
                    f"routing.rules {rule.name!r}: unknown destination(s) {', '.join(unknown)}; "
                    f"configured: {', '.join(names) or 'none'}"
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


def parse_peer(text: str) -> tuple[str, str, int]:
    """Parse ``AET@HOST:PORT`` (HOST may be ``[v6]``) into its parts, validating each."""
    match = re.fullmatch(r"(?P<ae>[^@]+)@(?P<host>\[[^\]]+\]|[^:\[\]]+):(?P<port>\d{1,5})", text.strip())
    if not match:
        raise ValueError(f"{text!r} is not AET@HOST:PORT")
    port = int(match.group("port"))
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} out of range 1-65535")
    return validate_ae_title(match.group("ae")), match.group("host").strip("[]"), port


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Build the configuration from embedded defaults, the TOML file and the environment."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    env = dict(os.environ if environ is None else environ)
    saved = dict(os.environ)
    try:
        if environ is not None:  # pydantic-settings reads os.environ; scope a given mapping to this call
            os.environ.clear()
            os.environ.update(env)
        return Config(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from exc
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    finally:
        if environ is not None:
            os.environ.clear()
            os.environ.update(saved)


def _describe(exc: ValidationError, path: Path | None) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        env_name = ENV_PREFIX + "__".join(str(p) for p in err["loc"][:2]).upper()
        where = f"{path} or {env_name}" if path else env_name
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see deploy/pacs-triage.example.toml)"
        lines.append(f"{key}: {msg} [set in {where}]")
    return "invalid configuration:\n  " + "\n  ".join(lines)
