"""The DICOM receiver (C-ECHO, C-STORE SCP) on pynetdicom.

C-STORE (PS3.4 B.2.2): validate the request and data set, write the bytes durably and record
them (``storage.ingest``), and only then answer 0x0000. Every refusal comes from a typed error
through ``daemon/dicom/status.py``.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import ssl
import threading
import time
import uuid
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.utils import make_target

from daemon.config import Config
from daemon.dicom import sop_classes
from daemon.dicom.access import AccessPolicy, Refusal
from daemon.dicom.encoding import check_encoding
from daemon.dicom.errors import InvalidDataset, ReceiveError
from daemon.dicom.file_meta import file_header
from daemon.dicom.hardening import (
    UNLIMITED_BY_PYNETDICOM,
    ConnectionLimits,
    HardenedServer,
    over_association_limit,
)
from daemon.dicom.status import StoreStatus, status_for
from daemon.dicom.validation import check_request_uids, validate_received
from daemon.logs import bind_ids, peer_text, quiet_pynetdicom, unbind_ids
from daemon.telemetry import receiver_instruments
from storage.errors import StorageError
from storage.ingest import AssociationInfo, Ingest
from vocabulary import MAX_UID_LENGTH

log = logging.getLogger(__name__)

# A-ASSOCIATE-RJ: rejected-permanent (0x01) by the service user (0x01), PS3.8 Table 9-21.
_REJECT_DIAGNOSTIC = {Refusal.CALLING_AE_NOT_RECOGNISED: 0x03, Refusal.CALLED_AE_NOT_RECOGNISED: 0x07}
# A-ASSOCIATE-RJ: rejected-transient (0x02) by the service provider, presentation related (0x03),
# local-limit-exceeded (0x02): what pynetdicom itself answers over its limit (PS3.8 Table 9-21).
_REJECT_BUSY = (0x02, 0x03, 0x02)


def _status(status: StoreStatus, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = int(status)
    if comment:
        ds.ErrorComment = comment[:64]  # LO, 64 characters
    return ds


def make_tls_context(config: Config) -> ssl.SSLContext:
    """Server-side TLS context (PS3.15 B.1/B.9: TLS 1.2 or later)."""
    tls = config.tls
    assert tls.certificate is not None and tls.private_key is not None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.certificate), str(tls.private_key))
    if tls.ca_certificates is not None:
        ctx.load_verify_locations(str(tls.ca_certificates))
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    return ctx


class Receiver:
    """Owns the pynetdicom AE, its servers (plain and TLS) and the event handlers."""

    def __init__(self, config: Config, ingest: Ingest, *, reuse_port: bool = False) -> None:
        self.config = config
        self.ingest = ingest
        self.reuse_port = (
            reuse_port  # one of several receiver processes on the port (daemon.service.receivers)
        )
        self.policy = AccessPolicy(config.access, config.ae_title)
        self._associations: dict[int, AssociationInfo] = {}
        self._lock = threading.Lock()
        self._servers: list[ThreadedAssociationServer] = []
        self.metrics = receiver_instruments()
        quiet_pynetdicom()
        self.ae = self._build_ae()

    def _build_ae(self) -> AE:
        dicom = self.config.dicom
        ae = AE(ae_title=self.config.ae_title)
        # dicom.max_associations is enforced in _on_requested, counting only associations whose
        # request is complete: pynetdicom would count connections still negotiating as well.
        ae.maximum_associations = UNLIMITED_BY_PYNETDICOM
        ae.maximum_pdu_size = dicom.max_pdu_size
        ae.acse_timeout = dicom.acse_timeout
        ae.dimse_timeout = dicom.dimse_timeout
        ae.network_timeout = dicom.network_timeout
        # Called AE title and calling peers are checked by AccessPolicy (clearer logs).
        ae.require_called_aet = False
        ae.add_supported_context(sop_classes.VERIFICATION)
        for uid in sop_classes.ACCEPTED_STORAGE:
            ae.add_supported_context(uid, sop_classes.TRANSFER_SYNTAXES)
        return ae

    @property
    def handlers(self) -> list[Any]:
        return [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
            (evt.EVT_DIMSE_RECV, self._on_dimse_recv),
        ]

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> list[tuple[str, int, bool]]:
        """Start the plain (and TLS) servers; returns (address, port, tls) of each."""
        host = self.config.dicom.bind_address
        bound = []
        server = self._start_server((host, self.config.port), None)
        bound.append((host, server.server_address[1], False))
        if self.config.tls.enabled:
            tls_server = self._start_server((host, self.config.tls.port), make_tls_context(self.config))
            bound.append((host, tls_server.server_address[1], True))
        for address, port, tls in bound:
            log.info(
                "listening as %s on %s:%d%s", self.config.ae_title, address, port, " (TLS)" if tls else ""
            )
        return bound

    def _start_server(
        self, address: tuple[str, int], ssl_context: ssl.SSLContext | None
    ) -> ThreadedAssociationServer:
        """What ``AE.start_server(block=False)`` does, with our bounded server (SO_REUSEPORT or not)."""
        server_class = functools.partial(
            HardenedServer,
            limits=ConnectionLimits.from_config(self.config.dicom),
            reuse_port=self.reuse_port,
        )
        server = self.ae.make_server(
            address,
            ssl_context=ssl_context,
            evt_handlers=self.handlers,
            server_class=server_class,  # type: ignore[arg-type]  # a partial of a subclass
        )
        thread = threading.Thread(
            target=make_target(server.serve_forever), name=f"AcceptorServer@{address[1]}", daemon=True
        )
        thread.start()
        self.ae._servers.append(server)  # AssociationServer.shutdown() removes it from there
        self._servers.append(server)
        return server

    def check(self) -> None:
        """Supervision hook of ``serve`` (nothing to do in-process; see daemon.service.receivers)."""

    def active_associations(self) -> list[Association]:
        return [a for s in self._servers for a in s.active_associations]

    def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop accepting; let in-flight associations finish for ``grace_seconds``, then abort them.

        A store being recorded when the abort comes still completes (or rolls back) atomically in
        its own thread; it is the peer that loses the response and will resend.
        """
        for server in list(self._servers):
            server.shutdown()
        deadline = time.monotonic() + grace_seconds
        while self.active_associations() and time.monotonic() < deadline:
            time.sleep(0.05)
        remaining = self.active_associations()
        for assoc in remaining:
            log.warning("aborting association from %s at shutdown", peer_text(assoc.requestor.ae_title))
            assoc.abort()
        for assoc in remaining:
            assoc.join(timeout=grace_seconds)
        self._servers.clear()
        self.ae.shutdown()

    # -- handlers ----------------------------------------------------------------------------

    def _on_requested(self, event: Event) -> None:
        assoc = event.assoc
        # At EVT_REQUESTED pynetdicom has not yet copied the titles out of the A-ASSOCIATE-RQ
        # (requestor.ae_title is still empty): read them from the request itself.
        request = assoc.requestor.primitive
        calling = str(request.calling_ae_title) if request else ""
        called = str(request.called_ae_title) if request else ""
        decision = self.policy.decide(calling, called, assoc.requestor.address)
        if decision.allowed:
            if over_association_limit(assoc, self.config.dicom.max_associations):
                log.warning(
                    "rejected association from %s (transient): dicom.max_associations (%d) reached",
                    assoc.requestor.address,
                    self.config.dicom.max_associations,
                )
                self.metrics.associations_rejected.labels(reason="busy").inc()
                assoc.acse.send_reject(*_REJECT_BUSY)
                assoc.kill()
            return
        assert decision.refusal is not None
        self.metrics.associations_rejected.labels(reason=decision.refusal.name.lower()).inc()
        # Peer strings through peer_text (issue 11 item 9): a newline cannot start a forged line.
        log.warning(
            "rejected association from %s at %s (called %s): %s",
            peer_text(calling),
            assoc.requestor.address,
            peer_text(called),
            peer_text(decision.reason),
        )
        assoc.acse.send_reject(0x01, 0x01, _REJECT_DIAGNOSTIC[decision.refusal])
        # As pynetdicom does after its own rejections: wait until the A-ASSOCIATE-RJ is out and the
        # peer closed, or the socket is shut down first and the peer sees an abort instead.
        assoc.kill()

    def _on_accepted(self, event: Event) -> None:
        assoc = event.assoc
        info = AssociationInfo(
            id=str(uuid.uuid4()),
            calling_ae=assoc.requestor.ae_title.strip()[:16],
            called_ae=self.config.ae_title,
            source_address=assoc.requestor.address[:64],
            started_at=dt.datetime.now(dt.UTC),
        )
        with self._lock:
            self._associations[id(assoc)] = info
        self.metrics.associations.inc()
        self.metrics.associations_active.inc()
        bind_ids(association_id=info.id[:8])  # every later line of this association's thread
        log.info(
            "association %s accepted from %s at %s",
            info.id[:8],
            peer_text(info.calling_ae),
            info.source_address,
        )

    def _on_echo(self, event: Event) -> int:
        return 0x0000

    def _on_dimse_recv(self, event: Event) -> None:
        """Answer C-STOREs that pynetdicom would drop or abort on, with C000 (PS3.4 B.2.3).

        pynetdicom ignores a request missing a required command field (the peer then waits for its
        DIMSE timeout), and aborts the association on a request UID over 64 characters or a SOP
        class it has no service for. We answer at once, remove the request's UIDs so pynetdicom
        ignores it, and keep the association.
        """
        command = event.message.command_set
        if command.get("CommandField") != 0x0001:  # C-STORE-RQ
            return
        keywords = ("AffectedSOPClassUID", "AffectedSOPInstanceUID")
        sop_class, sop_instance = (str(command.get(k) or "") for k in keywords)
        if not all(0 < len(v) <= MAX_UID_LENGTH for v in (sop_class, sop_instance)):
            comment = "Affected SOP Class/Instance UID empty or over 64 characters"
        elif sop_class not in sop_classes.ACCEPTED_STORAGE:
            comment = "Affected SOP Class UID is not a storage class accepted here"
        else:
            return  # anything else wrong with them is found by check_request_uids in _on_store
        for keyword in keywords:
            if keyword in command:
                del command[keyword]
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = command.MessageID
        rsp.Status = int(StoreStatus.CANNOT_UNDERSTAND)
        rsp.ErrorComment = comment  # type: ignore[assignment]  # pynetdicom declares it as None
        self.metrics.refusals.labels(status=f"0x{rsp.Status:04X}").inc()
        log.warning(
            "C-STORE %s of class %s from %s refused with 0x%04X: %s",
            peer_text(sop_instance),
            peer_text(sop_class),
            peer_text(event.assoc.requestor.ae_title),
            rsp.Status,
            comment,
        )
        event.assoc.dimse.send_msg(rsp, cast(int, event.message.context_id))

    def _on_store(self, event: Event) -> Dataset | int:
        started = time.perf_counter()
        request = cast(C_STORE, event.request)
        try:
            with self._lock:
                info = self._associations[id(event.assoc)]
            sop_class, sop_instance = check_request_uids(
                request.AffectedSOPClassUID, request.AffectedSOPInstanceUID
            )
            transfer_syntax = str(event.context.transfer_syntax)
            stream = event.encoded_dataset(include_meta=False)
            check_encoding(stream, transfer_syntax)  # the bytes we would store, before any decoding
            try:
                ds = event.dataset
            except Exception as exc:
                raise InvalidDataset(f"data set cannot be decoded as {transfer_syntax}: {exc}") from exc
            incoming = validate_received(
                ds,
                request_sop_class=sop_class,
                request_sop_instance=sop_instance,
                transfer_syntax=transfer_syntax,
                is_image=sop_classes.is_image(sop_class),
            )
            header = file_header(sop_class, sop_instance, transfer_syntax)
            outcome = self.ingest.store(incoming, (header, stream), info)
        except (ReceiveError, StorageError) as exc:
            status = status_for(exc)
            self.metrics.refusals.labels(status=f"0x{status:04X}").inc()
            log.warning(
                "C-STORE %s from %s refused with 0x%04X: %s",
                peer_text(request.AffectedSOPInstanceUID),
                peer_text(event.assoc.requestor.ae_title),
                status,
                peer_text(exc, limit=400),
            )
            return _status(status, str(exc))
        except Exception as exc:
            # The one broad catch of the receiver: an unexpected bug must not kill the association
            # silently; the peer gets a failure status and will resend.
            log.exception("C-STORE %s failed unexpectedly", peer_text(request.AffectedSOPInstanceUID))
            self.metrics.refusals.labels(status=f"0x{status_for(exc):04X}").inc()
            return _status(status_for(exc), "internal error; see the pacs-triage log")
        self.metrics.store_seconds.observe(time.perf_counter() - started)
        log.debug(
            "C-STORE %s %s in %.1f ms",
            incoming.sop_instance_uid,
            outcome.value,
            (time.perf_counter() - started) * 1000,
        )
        return int(StoreStatus.SUCCESS)  # a bare status: cheaper for pynetdicom than a Dataset

    def _end(self, event: Event, *, released: bool) -> None:
        with self._lock:
            info = self._associations.pop(id(event.assoc), None)
        if info is None:
            return
        self.metrics.associations_active.dec()
        unbind_ids("association_id")
        log.info("association %s %s", info.id[:8], "released" if released else "ended without release")
        try:
            self.ingest.end_association(info.id, released=released)
        except StorageError as exc:
            # Completion then falls back to the idle timeout; nothing acknowledged is at risk.
            log.warning("could not record the end of association %s: %s", info.id[:8], exc)

    def _on_released(self, event: Event) -> None:
        self._end(event, released=True)

    def _on_aborted(self, event: Event) -> None:
        self._end(event, released=False)

    def _on_conn_close(self, event: Event) -> None:
        self._end(event, released=False)
