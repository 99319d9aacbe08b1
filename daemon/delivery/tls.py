"""TLS client contexts for the non-DICOM destinations (MLLP over TLS, HTTPS to FHIR).

A destination's own TLS files (CA, client certificate, key) that are missing or unreadable are its
configuration's problem: :class:`Permanent`, naming the key to fix; no send is attempted.
"""

from __future__ import annotations

import os
import ssl

from daemon.config import DestinationConfig
from daemon.delivery.base import Permanent


def client_context(config: DestinationConfig) -> ssl.SSLContext:
    """A verifying client context (TLS 1.2 or newer) with the destination's CA and client certificate."""
    fix = f"fix it in [[destinations]] {config.name!r}, restart, then `pacs-triage deliveries retry`"
    for key in ("ca_certificates", "certificate", "private_key"):
        path = getattr(config, key)
        if path is not None and not os.access(path, os.R_OK):
            raise Permanent(f"destination {config.name!r}: {key} {path} is missing or unreadable; {fix}")
    try:
        context = ssl.create_default_context(
            cafile=str(config.ca_certificates) if config.ca_certificates else None
        )
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if config.certificate is not None:
            context.load_cert_chain(
                str(config.certificate), str(config.private_key) if config.private_key else None
            )
    except (OSError, ssl.SSLError) as exc:
        raise Permanent(f"destination {config.name!r}: cannot use its TLS files ({exc}); {fix}") from exc
    return context
