"""DICOM C-STORE destinations: one association per object (``daemon/dicom/scu.py``).

How each outcome maps (the status categories come from ``daemon/dicom/status.py``):

* success or warning status: delivered (a warning, e.g. B000 coercion, is kept in the audit);
* a failure status the object cannot pass (A9xx, Cxxx, 0x0122, 0x0124): Permanent; others
  (A7xx out of resources, 0x0110, unknown): Transient;
* association rejected-permanent (wrong called AE title, our AE unknown to the peer): Permanent;
  rejected-transient, unreachable, aborted, no response: Transient;
* the peer accepts no context for the object's SOP class: Permanent;
* our TLS files (CA, certificate, key) missing or unreadable: Permanent, naming the key to fix.
"""

from __future__ import annotations

import os
import ssl

from daemon.config import DestinationConfig
from daemon.delivery.base import Accepted, Outgoing, Permanent, Transient
from daemon.dicom.scu import (
    AssociationFailed,
    AssociationRejected,
    ContextNotAccepted,
    Peer,
    TlsClient,
    echo,
    store_file,
)
from daemon.dicom.status import category, refused_for_good


class DicomDestination:
    """A PACS (or any Storage SCP) that receives results by C-STORE."""

    def __init__(self, config: DestinationConfig, calling_ae: str) -> None:
        self.config = config
        self.name = config.name
        self.calling_ae = calling_ae
        if config.ae_title is None or config.host is None or config.port is None:
            raise Permanent(f"destination {config.name!r}: a DICOM destination needs ae_title, host and port")
        self.host = config.host
        self.peer = Peer(config.ae_title, config.host, config.port)

    def __str__(self) -> str:
        return str(self.peer)

    def _tls(self) -> TlsClient | None:
        c = self.config
        if not c.tls:
            return None
        for key, path in (
            ("ca_certificates", c.ca_certificates),
            ("certificate", c.certificate),
            ("private_key", c.private_key),
        ):
            if path is not None and not os.access(path, os.R_OK):
                raise Permanent(
                    f"destination {self.name!r}: {key} {path} is missing or unreadable; fix {key} of "
                    f"[[destinations]] {self.name!r}, restart, then `pacs-triage deliveries retry`"
                )
        tls = TlsClient(
            ca_certificates=c.ca_certificates, certificate=c.certificate, private_key=c.private_key
        )
        try:
            tls.context(self.host)  # load the files now: a broken file is this destination's problem only
        except (OSError, ssl.SSLError) as exc:
            raise Permanent(
                f"destination {self.name!r}: cannot use its TLS files ({exc}); fix ca_certificates / "
                f"certificate / private_key of [[destinations]] {self.name!r}, restart, then "
                "`pacs-triage deliveries retry`"
            ) from exc
        return tls

    def send(self, item: Outgoing) -> Accepted:
        tls = self._tls()
        try:
            sent = store_file(
                self.peer,
                item.path,
                calling_ae=self.calling_ae,
                tls=tls,
                timeout=self.config.timeout_seconds,
            )
        except AssociationRejected as exc:
            raise _rejected(exc) from exc
        except ContextNotAccepted as exc:
            raise Permanent(f"{exc}; the peer must accept this SOP class") from exc
        except AssociationFailed as exc:
            raise Transient(str(exc)) from exc
        except ValueError as exc:
            raise Permanent(f"result file of {item.sop_instance_uid} is not readable DICOM: {exc}") from exc
        if sent.status is None:
            raise Transient(f"{self.peer}: {sent.comment or 'not sent'}")
        kind = category(sent.status)
        if kind == "success":
            return Accepted(status=sent.status)
        if kind == "warning":
            return Accepted(
                status=sent.status, warning=f"warning: {sent.comment}" if sent.comment else "warning"
            )
        reason = (
            f"{self.peer} answered 0x{sent.status:04X} ({kind}){': ' + sent.comment if sent.comment else ''}"
        )
        if refused_for_good(sent.status):
            raise Permanent(reason, status=sent.status)
        raise Transient(reason, status=sent.status)

    def check(self) -> None:
        tls = self._tls()
        try:
            status = echo(self.peer, calling_ae=self.calling_ae, tls=tls, timeout=self.config.timeout_seconds)
        except AssociationRejected as exc:
            raise _rejected(exc) from exc
        except AssociationFailed as exc:
            raise Transient(str(exc)) from exc
        if category(status) != "success":
            raise Transient(f"{self.peer} answered C-ECHO with 0x{status:04X}", status=status)


def _rejected(exc: AssociationRejected) -> Permanent | Transient:
    if exc.permanent:
        return Permanent(
            f"{exc}; check the destination's ae_title and that the peer knows our AE title, then "
            "`pacs-triage deliveries retry`"
        )
    return Transient(str(exc))
