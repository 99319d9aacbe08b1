"""Where results go and how they are sent: destinations, the dispatcher, and spool retention."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from daemon.config.base import AETitle, Name, _Section
from daemon.config.queue import BackoffConfig

DEFAULT_DESTINATION_NAME = "default"  # the name PACS_TRIAGE_DESTINATION's destination gets

DestinationKind = Literal["dicom", "hl7", "fhir"]


class Content(enum.StrEnum):
    """What a destination receives of a job's results (``receives``, per destination and per rule)."""

    SR = "sr"  # the DICOM SR (C-STORE)
    SEG = "seg"  # the DICOM SEG
    KOS = "kos"  # the Key Object Selection document
    KEY_IMAGES = "key_images"  # the key images (secondary captures)
    HL7_ORU = "hl7_oru"  # an HL7 v2 ORU^R01 result message (MLLP)
    HL7_PRIORITY = "hl7_priority"  # an HL7 v2 order update carrying the priority (ORM^O01 / OMI^O23)
    FHIR = "fhir"  # a FHIR R4 transaction Bundle (DiagnosticReport, Observations, Task)


# What each kind of destination can receive, and what it receives when nothing says otherwise.
KIND_CONTENTS: dict[str, tuple[Content, ...]] = {
    "dicom": (Content.SR, Content.SEG, Content.KOS, Content.KEY_IMAGES),
    "hl7": (Content.HL7_ORU, Content.HL7_PRIORITY),
    "fhir": (Content.FHIR,),
}
DEFAULT_CONTENTS: dict[str, tuple[Content, ...]] = {
    "dicom": KIND_CONTENTS["dicom"],
    "hl7": (Content.HL7_ORU,),
    "fhir": (Content.FHIR,),
}


def check_contents(kind: str, contents: tuple[Content, ...], where: str) -> None:
    """Refuse contents a destination of ``kind`` cannot receive (e.g. ``hl7_oru`` on a DICOM peer)."""
    wrong = [c.value for c in contents if c not in KIND_CONTENTS[kind]]
    if wrong:
        raise ValueError(
            f"{where}: a {kind!r} destination cannot receive {', '.join(wrong)}; it can receive "
            f"{', '.join(c.value for c in KIND_CONTENTS[kind])}"
        )


class DestinationConfig(_Section):
    """A peer that receives results; ``kind`` picks its adapter (``daemon/delivery/registry.py``).

    * ``dicom``: C-STORE to ``ae_title`` at ``host``:``port``;
    * ``hl7``: HL7 v2.5 messages over MLLP to ``host``:``port`` (``tls``: MLLP over TLS);
    * ``fhir``: a FHIR R4 transaction Bundle POSTed to ``url`` (the server's base), with ``token``.
    """

    name: Name
    kind: DestinationKind = "dicom"
    receives: tuple[Content, ...] | None = None  # default: dicom every object, hl7 the ORU, fhir the Bundle
    ae_title: AETitle | None = None  # dicom: the peer's AE title
    host: str | None = Field(default=None, min_length=1, max_length=253)  # dicom, hl7
    port: int | None = Field(default=None, ge=1, le=65535)  # dicom, hl7
    url: str | None = None  # fhir: the server's base URL (https://fhir.example.org/r4)
    token: SecretStr | None = None  # fhir: bearer token (better: PACS_TRIAGE_DESTINATIONS as JSON)
    tls: bool = False
    ca_certificates: Path | None = None  # trust this CA for the peer's certificate (default: system CAs)
    certificate: Path | None = None  # our client certificate, when the peer wants one
    private_key: Path | None = None
    timeout_seconds: float = Field(default=30.0, gt=0)  # connection and answer timeouts
    # hl7: MSH-3/4 (us) and MSH-5/6 (the receiver); the order update's message type; MSH-11.
    sending_application: str = Field(default="PACS_TRIAGE", min_length=1, max_length=180)
    sending_facility: str = Field(default="", max_length=180)
    receiving_application: str = Field(default="", max_length=180)
    receiving_facility: str = Field(default="", max_length=180)
    order_message: Literal["OMI^O23", "ORM^O01"] = "OMI^O23"  # ORM^O01 for older RIS
    processing_id: Literal["P", "T", "D"] = "P"  # production, training, debugging

    @field_validator("sending_application", "sending_facility", "receiving_application", "receiving_facility")
    @classmethod
    def _hl7_text(cls, value: str) -> str:
        if any(c in value for c in "|^~\\&\r\n"):
            raise ValueError(f"{value!r}: HL7 delimiters (| ^ ~ \\ &) and line breaks are not allowed")
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} must start with https:// (or http:// on a trusted network)")
        return value.rstrip("/") if value is not None else None

    @model_validator(mode="after")
    def _kind_keys(self) -> DestinationConfig:
        where = f"destination {self.name!r}"
        needs = {"dicom": ("ae_title", "host", "port"), "hl7": ("host", "port"), "fhir": ("url",)}
        missing = [key for key in needs[self.kind] if getattr(self, key) is None]
        if missing:
            raise ValueError(f"{where} (kind {self.kind!r}) needs {', '.join(missing)}")
        if self.receives is not None:
            check_contents(self.kind, self.receives, where)
        return self

    @property
    def contents(self) -> tuple[Content, ...]:
        """What this destination receives unless a routing rule says otherwise."""
        return self.receives if self.receives is not None else DEFAULT_CONTENTS[self.kind]

    @property
    def peer(self) -> str:
        """The address, for operators: ``AET@HOST:PORT``, ``mllp://HOST:PORT`` or the FHIR base URL."""
        if self.kind == "fhir":
            return str(self.url)
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        if self.kind == "hl7":
            return f"{'mllps' if self.tls else 'mllp'}://{host}:{self.port}"
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
    """Removing the spool files (images and results) of studies that are done with, after a period.

    On by default: the PACS is the archive, and patient data should not pile up here. Rows, jobs,
    results' metadata and the audit log stay. 0 keeps that kind of study for ever.
    """

    # Studies whose every result was delivered (the results are in the PACS).
    delete_after_days: float = Field(default=7.0, ge=0)
    # Studies whose analysis failed for good (no usable series, bad geometry) or was cancelled.
    # Dead jobs (retryable) are kept until an operator retries or cancels them.
    failed_after_days: float = Field(default=30.0, ge=0)
    not_routed_after_days: float = Field(default=7.0, ge=0)  # studies no routing rule matched
    interval_seconds: float = Field(default=3600.0, gt=0)

    @property
    def enabled(self) -> bool:
        return any((self.delete_after_days, self.failed_after_days, self.not_routed_after_days))
