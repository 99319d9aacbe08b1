"""Where results go and how they are sent: destinations, the dispatcher, and spool retention."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from daemon.config.base import AETitle, Name, _Section
from daemon.config.queue import BackoffConfig

DEFAULT_DESTINATION_NAME = "default"  # the name PACS_TRIAGE_DESTINATION's destination gets


class DestinationConfig(_Section):
    """A peer that receives results; ``kind`` picks its adapter (``daemon/delivery/registry.py``)."""

    name: Name
    kind: Literal["dicom"] = "dicom"  # DICOM C-STORE (HL7 MLLP and FHIR to come)
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
    # A send heartbeats its lease; a dispatcher that died is noticed after lease_seconds and the
    # row is sent again (a re-send, counted in `status`; the UIDs make it a duplicate the PACS ignores).
    lease_seconds: float = Field(default=30.0, gt=0)
    heartbeat_seconds: float | None = Field(default=None, gt=0)  # default: a third of lease_seconds
    reap_interval_seconds: float = Field(default=5.0, gt=0)
    backoff: BackoffConfig = BackoffConfig(base_seconds=10.0, max_seconds=900.0)

    @model_validator(mode="after")
    def _heartbeat(self) -> DispatchConfig:
        if self.heartbeat_seconds is not None and self.heartbeat_seconds >= self.lease_seconds:
            raise ValueError(
                f"heartbeat_seconds ({self.heartbeat_seconds}) must be shorter than lease_seconds "
                f"({self.lease_seconds}) or every send's lease expires"
            )
        return self

    @property
    def heartbeat_interval(self) -> float:
        return self.heartbeat_seconds or self.lease_seconds / 3


class RetentionConfig(_Section):
    """Removing spool files of studies whose results were all delivered long enough ago."""

    delete_after_days: float | None = Field(default=None, gt=0)  # None: keep everything
    interval_seconds: float = Field(default=3600.0, gt=0)
