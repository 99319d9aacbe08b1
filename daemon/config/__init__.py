"""One typed, validated configuration object, built once at start-up and passed explicitly.

Sources, later wins: embedded defaults < TOML file (``--config``) < environment variables
(``PACS_TRIAGE_<KEY>``, ``PACS_TRIAGE_<SECTION>__<KEY>``), both given explicitly to
``load_config`` (see ``sources``). One module per group of sections:

- ``base``: the error type, the frozen section base, value types (sizes, AE titles, names, peers);
- ``dicom``: ``[dicom]``, ``[access]``, ``[tls]``;
- ``queue``: ``[completion]``, ``[workers]`` and the backoff policy;
- ``routing``: ``[[routing.rules]]``;
- ``delivery``: ``[[destinations]]``, ``[dispatch]``, ``[retention]``;
- ``pipelines``: ``[pipelines]`` and ``[[pipelines.monai]]``;
- ``http``: ``[http]`` and ``[[http.tokens]]`` (API, pages, health endpoints);
- ``model``: the root ``Config`` with the top-level keys, ``[storage]`` and ``[logging]``;
- ``sources``: reading the file and the environment, merging, errors that name the key;
- ``report``: the effective values with their sources, secrets masked (``pacs-triage config check``).
"""

from daemon.config.base import (
    DEFAULT_AE_TITLE,
    DEFAULT_PORT,
    DEFAULT_TLS_PORT,
    AETitle,
    ByteSize,
    ConfigError,
    Name,
    parse_peer,
    validate_ae_title,
)
from daemon.config.delivery import (
    DEFAULT_DESTINATION_NAME,
    Content,
    DestinationConfig,
    DestinationKind,
    DispatchConfig,
    RetentionConfig,
)
from daemon.config.dicom import AccessConfig, AllowEntry, DicomConfig, TlsConfig
from daemon.config.http import ApiToken, HttpConfig
from daemon.config.model import Config, LoggingConfig, StorageConfig, default_home
from daemon.config.pipelines import (
    BUILTIN_PIPELINES,
    BundleConfig,
    ChannelConfig,
    MonaiPipelineConfig,
    Orientation,
    PipelinesConfig,
    ThresholdsConfig,
)
from daemon.config.queue import BackoffConfig, CompletionConfig, WorkersConfig
from daemon.config.routing import PriorityName, RouteReceives, RouteRule, RoutingConfig
from daemon.config.sources import (
    ENV_PREFIX,
    LoadedConfig,
    Origin,
    Provenance,
    Source,
    environment,
    load,
    load_config,
)

__all__ = [
    "BUILTIN_PIPELINES",
    "DEFAULT_AE_TITLE",
    "DEFAULT_DESTINATION_NAME",
    "DEFAULT_PORT",
    "DEFAULT_TLS_PORT",
    "ENV_PREFIX",
    "AETitle",
    "AccessConfig",
    "AllowEntry",
    "ApiToken",
    "BackoffConfig",
    "BundleConfig",
    "ByteSize",
    "ChannelConfig",
    "CompletionConfig",
    "Config",
    "ConfigError",
    "Content",
    "DestinationConfig",
    "DestinationKind",
    "DicomConfig",
    "DispatchConfig",
    "HttpConfig",
    "LoadedConfig",
    "LoggingConfig",
    "MonaiPipelineConfig",
    "Name",
    "Orientation",
    "Origin",
    "PipelinesConfig",
    "PriorityName",
    "Provenance",
    "RetentionConfig",
    "RouteReceives",
    "RouteRule",
    "RoutingConfig",
    "Source",
    "StorageConfig",
    "ThresholdsConfig",
    "TlsConfig",
    "WorkersConfig",
    "default_home",
    "environment",
    "load",
    "load_config",
    "parse_peer",
    "validate_ae_title",
]
