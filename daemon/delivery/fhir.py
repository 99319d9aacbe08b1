"""FHIR R4 destinations: a transaction Bundle per result, POSTed to the server's base URL.

The Bundle (``fhir_bundle.py``) is built from the job's SR and validated with fhir.resources
before it leaves; it is sent with ``Authorization: Bearer <token>`` over HTTPS (the destination's
CA and client certificate when given). Its entries are conditional updates keyed by identifiers
that derive from the result, so a re-send changes nothing on the server.

How the answer maps:

* 2xx: delivered (the status code is kept; a ``transaction-response`` entry that is not 2xx is
  noted in the audit log);
* 408 Request Timeout, 429 Too Many Requests: Transient (``Retry-After`` is noted in the reason);
* 401 / 403: Permanent, naming the token; any other 4xx: Permanent (the server refuses this
  Bundle: its OperationOutcome is quoted);
* 5xx, no answer within ``timeout_seconds``, refused or dropped connection, TLS handshake failure:
  Transient;
* a Bundle that fails validation, our TLS files broken, the extra not installed: Permanent.
"""

from __future__ import annotations

import json
from typing import Any

from daemon.config import Content, DestinationConfig
from daemon.delivery.base import Accepted, Outgoing, Permanent, Transient
from daemon.delivery.fhir_bundle import transaction, validate
from daemon.delivery.report import load_report
from daemon.delivery.tls import client_context

FHIR_JSON = "application/fhir+json"
RETRYABLE_4XX = frozenset({408, 429})


def _httpx() -> Any:
    try:
        import fhir.resources  # noqa: F401
        import httpx
    except ImportError as exc:
        raise Permanent(
            f"FHIR destinations need the packages fhir.resources and httpx ({exc.name} is missing): install "
            "the 'fhir' extra (pip install 'pacs-triage[fhir]'), restart, then `pacs-triage deliveries retry`"
        ) from exc
    return httpx


class FhirDestination:
    """A FHIR R4 server that takes transaction Bundles."""

    def __init__(self, config: DestinationConfig, calling_ae: str) -> None:
        self.config = config
        self.name = config.name

    def __str__(self) -> str:
        return self.config.peer

    def bundle(self, item: Outgoing) -> dict[str, Any]:
        if item.content != Content.FHIR:
            raise Permanent(
                f"destination {self.name!r} is a FHIR destination and cannot send "
                f"{item.content or 'DICOM objects'!r}; list only fhir for it"
            )
        bundle = transaction(load_report(item.path))
        try:
            validate(bundle)
        except ValueError as exc:
            raise Permanent(f"{exc}; this is a bug of pacs-triage, please report it") from exc
        return bundle

    def send(self, item: Outgoing) -> Accepted:
        httpx = _httpx()
        body = json.dumps(self.bundle(item)).encode()
        response = self._request(httpx, "POST", str(self.config.url), content=body)
        if response.is_success:
            return Accepted(status=response.status_code, warning=_failed_entries(response))
        raise self._refused(response)

    def check(self) -> None:
        """GET <base>/metadata (the CapabilityStatement): reachable, TLS, token accepted."""
        httpx = _httpx()
        response = self._request(httpx, "GET", f"{self.config.url}/metadata")
        if not response.is_success:
            raise self._refused(response)

    def _request(self, httpx: Any, method: str, url: str, content: bytes | None = None) -> Any:
        headers = {"Accept": FHIR_JSON}
        if content is not None:
            headers["Content-Type"] = f"{FHIR_JSON}; charset=utf-8"
        if self.config.token is not None:
            headers["Authorization"] = f"Bearer {self.config.token.get_secret_value()}"
        verify: Any = client_context(self.config) if url.startswith("https://") else True
        try:
            with httpx.Client(verify=verify, timeout=self.config.timeout_seconds) as client:
                return client.request(method, url, content=content, headers=headers)
        except httpx.TimeoutException as exc:
            raise Transient(f"{self}: no answer within {self.config.timeout_seconds:g} s ({exc})") from exc
        except httpx.TransportError as exc:
            raise Transient(f"{self}: {type(exc).__name__}: {exc}") from exc

    def _refused(self, response: Any) -> Transient | Permanent:
        code = response.status_code
        said = f"{self} answered HTTP {code}{_outcome(response)}"
        if code in RETRYABLE_4XX or code >= 500:
            after = response.headers.get("Retry-After")
            return Transient(said + (f" (Retry-After: {after})" if after else ""), status=code)
        if code in (401, 403):
            return Permanent(
                f"{said}; the server refuses our token: set token of [[destinations]] {self.name!r} "
                "(PACS_TRIAGE_DESTINATIONS), restart, then `pacs-triage deliveries retry`",
                status=code,
            )
        return Permanent(f"{said}; the server refuses this Bundle for good", status=code)


def _outcome(response: Any) -> str:
    """The diagnostics of an OperationOutcome answer, if any (short)."""
    try:
        data = response.json()
    except ValueError:
        return ""
    if not isinstance(data, dict) or data.get("resourceType") != "OperationOutcome":
        return ""
    texts = [i.get("diagnostics") or i.get("details", {}).get("text", "") for i in data.get("issue", [])]
    text = "; ".join(t for t in texts if t)
    return f": {text[:500]}" if text else ""


def _failed_entries(response: Any) -> str:
    """A note when the transaction-response lists an entry whose status is not 2xx (should not happen)."""
    try:
        data = response.json()
    except ValueError:
        return ""
    statuses = [
        str(e.get("response", {}).get("status", "")) for e in data.get("entry", []) if isinstance(e, dict)
    ]
    odd = [s for s in statuses if s and not s.startswith("2")]
    return f"transaction-response entries not 2xx: {', '.join(odd)}" if odd else ""
