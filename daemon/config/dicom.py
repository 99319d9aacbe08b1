"""The DICOM edge: the receiver's network settings, who may associate, and DICOM TLS."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from daemon.config.base import DEFAULT_TLS_PORT, AETitle, _Section


class DicomConfig(_Section):
    """DICOM network settings of the receiver."""

    bind_address: str = "0.0.0.0"  # listen everywhere; [access] decides who may associate
    max_associations: int = Field(default=16, ge=1, le=1000)
    # Our Maximum Length Received (PS3.8 D.1). A 0.5 MB CT slice still fits one PDU (as fast as
    # the former 0 = unlimited); a PDU announcing more than this plus 64 KiB is aborted before any
    # of it is buffered, so memory per connection stays bounded (issue 11 item 8).
    max_pdu_size: int = Field(default=4 * 2**20, ge=4096, le=256 * 2**20)
    # Accept -> complete A-ASSOCIATE-RQ (TLS handshake included), from the first byte; a peer
    # that stalls mid-PDU is closed after this long (issue 11 item 6).
    acse_timeout: float = Field(default=30.0, gt=0)
    dimse_timeout: float = Field(default=60.0, gt=0)
    # Idle association -> abort; also the time one PDU may take from its first byte to its last.
    network_timeout: float = Field(default=120.0, gt=0)
    # Connections not yet associated (still before or in their A-ASSOCIATE-RQ), per source address
    # and in total; more are closed at accept. They never count against max_associations.
    max_pending_per_address: int = Field(default=16, ge=1, le=10_000)
    max_pending_connections: int = Field(default=128, ge=1, le=100_000)
    # Receiver processes sharing the port (SO_REUSEPORT), each with its own GIL and database
    # connection; 1 = receive in the serve process itself. See daemon/service/receivers.py.
    receivers: int = Field(default=1, ge=1, le=64)

    @field_validator("bind_address")
    @classmethod
    def _address(cls, value: str) -> str:
        ipaddress.ip_address(value)
        return value

    @field_validator("max_pdu_size", mode="before")
    @classmethod
    def _bounded_pdu(cls, value: object) -> object:
        if value in (0, "0"):
            raise ValueError(
                "0 (unlimited) is no longer accepted: any peer could make the receiver buffer gigabytes; "
                "remove the key or set a size such as 4194304 (4 MiB, the default)"
            )
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
