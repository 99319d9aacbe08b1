"""Dispatch: send each outbox row's result to its destination with a C-STORE, one association per result.

Every response status is checked (``daemon/dicom/status.py``): success delivers; a warning status
(e.g. B000, coercion of data elements) also delivers, because the peer stored the object, and
is kept in the audit log; anything else, or no response at all, is a failed attempt that the
outbox retries with backoff until it is ``dead``. A result's UIDs are deterministic, so a resend
after a lost response is a duplicate the PACS ignores.
"""

from __future__ import annotations

import logging
import threading

from daemon.config import Config, DestinationConfig
from daemon.dicom.scu import Peer, TlsClient, send_files
from daemon.dicom.status import category
from daemon.polling import run_until_stopped
from storage.leases import worker_name
from storage.outbox import DeliveryClaim, Outbox
from storage.spool import Spool

log = logging.getLogger(__name__)


def peer_of(destination: DestinationConfig) -> tuple[Peer, TlsClient | None]:
    tls = None
    if destination.tls:
        tls = TlsClient(
            ca_certificates=destination.ca_certificates,
            certificate=destination.certificate,
            private_key=destination.private_key,
        )
    return Peer(destination.ae_title, destination.host, destination.port), tls


class Dispatcher:
    """Claims due deliveries and sends them; run one per dispatch thread."""

    def __init__(self, config: Config, outbox: Outbox, results: Spool, *, name: str | None = None) -> None:
        self.config = config
        self.outbox = outbox
        self.results = results
        self.name = name or worker_name("dispatch")
        self.stop = threading.Event()

    def run(self) -> None:
        """Send due deliveries until :attr:`stop` is set."""
        run_until_stopped(
            self.stop,
            self.send_one,
            idle_seconds=self.config.dispatch.poll_seconds,
            who=f"dispatcher {self.name}",
        )

    def send_one(self) -> bool:
        """Claim one due delivery and attempt it; False when none was due."""
        claim = self.outbox.claim(self.name)
        if claim is None:
            return False
        self._attempt(claim)
        return True

    def _attempt(self, claim: DeliveryClaim) -> None:
        d = claim.delivery
        destination = next((x for x in self.config.all_destinations if x.name == d.destination), None)
        if destination is None:
            self._failed(
                claim,
                f"destination {d.destination!r} is no longer configured; add it back and run "
                f"`pacs-triage deliveries retry {d.id}`",
                permanent=True,
            )
            return
        if d.path is None or not self.results.path_of(d.path).is_file():
            self._failed(
                claim,
                f"result file of {d.sop_instance_uid} is missing from the spool ({d.path}); "
                "retry the job with `pacs-triage jobs retry`",
                permanent=True,
            )
            return
        peer, tls = peer_of(destination)
        results = list(
            send_files(
                peer,
                [self.results.path_of(d.path)],
                calling_ae=self.config.ae_title,
                tls=tls,
                timeout=destination.timeout_seconds,
            )
        )
        if len(results) != 1:
            self._failed(claim, f"expected one send result, got {len(results)}")
            return
        sent = results[0]
        if sent.status is None:
            self._failed(claim, f"{peer}: {sent.comment or 'not sent'}")
            return
        kind = category(sent.status)
        if kind in ("success", "warning"):
            comment = f"warning: {sent.comment}" if kind == "warning" else ""
            if self.outbox.delivered(claim, sent.status, comment=comment):
                log.info("delivery %d: %s stored by %s (0x%04X)", d.id, d.sop_instance_uid, peer, sent.status)
            else:
                log.warning(
                    "delivery %d: sent, but its lease was lost meanwhile (another dispatcher owns it)", d.id
                )
            return
        self._failed(
            claim,
            f"{peer} answered 0x{sent.status:04X} ({kind}){': ' + sent.comment if sent.comment else ''}",
            status=sent.status,
        )

    def _failed(
        self, claim: DeliveryClaim, error: str, *, status: int | None = None, permanent: bool = False
    ) -> None:
        state = self.outbox.failed(claim, error, status=status, permanent=permanent)
        log.warning(
            "delivery %d (attempt %d/%d) failed: %s -> %s",
            claim.delivery.id,
            claim.delivery.attempts,
            claim.delivery.max_attempts,
            error,
            state.value if state is not None else "lease lost",
        )


class DispatchThreads:
    """The dispatcher threads of ``serve``."""

    def __init__(self, config: Config, outbox: Outbox, results: Spool) -> None:
        self.dispatchers = [
            Dispatcher(config, outbox, results, name=f"{worker_name('dispatch')}#{i}")
            for i in range(config.dispatch.threads)
        ]
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        for d in self.dispatchers:
            thread = threading.Thread(target=d.run, name=d.name, daemon=True)
            thread.start()
            self.threads.append(thread)

    def stop(self, timeout: float) -> None:
        """Let in-flight sends finish (a send is bounded by its destination's timeouts)."""
        for d in self.dispatchers:
            d.stop.set()
        for thread in self.threads:
            thread.join(timeout=timeout)
