"""DICOM SCU side: C-ECHO and C-STORE of files to a peer (used by ``echo``, ``send`` and dispatch)."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.events import Event

from daemon.dicom import sop_classes
from daemon.dicom.status import category

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: presentation context IDs are odd numbers 1-255

# send_c_store(path) then sends the file's data set bytes as they are, streamed from disk, with
# the request UIDs taken from the file meta (as _prepare plans the contexts). Without it
# pynetdicom decodes and re-encodes the data set: a Deflated one arrives re-compressed, not
# byte for byte, and a whole multi-frame object is held in memory.
pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class TlsClient:
    """Client-side TLS: our certificate/key (when the peer wants one) and the CA to trust."""

    ca_certificates: Path | None = None
    certificate: Path | None = None
    private_key: Path | None = None

    def context(self, host: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_certificates)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.certificate is not None:
            ctx.load_cert_chain(str(self.certificate), str(self.private_key) if self.private_key else None)
        return ctx


@dataclass(frozen=True)
class SendResult:
    """The outcome for one file: a DIMSE status from the peer, or a local reason it was not sent."""

    path: Path
    status: int | None
    comment: str = ""
    sop_instance_uid: str = ""

    @property
    def ok(self) -> bool:
        return self.status is not None and category(self.status) in ("success", "warning")


class AssociationFailed(Exception):
    """The peer could not be reached, rejected the association or aborted it."""


class AssociationRejected(AssociationFailed):
    """The peer answered A-ASSOCIATE-RJ (PS3.8 9.3.4): ``permanent`` unless it said "transient"."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


class ContextNotAccepted(AssociationFailed):
    """The peer accepted none of the presentation contexts (SOP class, transfer syntax) we proposed."""


def _ae(calling_ae: str, timeout: float) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.maximum_pdu_size = 0
    return ae


def _associate(ae: AE, peer: Peer, tls: TlsClient | None) -> Association:
    tls_args = (tls.context(peer.host), peer.host) if tls is not None else None
    received: list[object] = []

    def on_acse(event: Event) -> None:
        received.append(getattr(event, "primitive", None))  # the A-ASSOCIATE-RJ, when rejected

    assoc = ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.ae_title,
        tls_args=tls_args,
        evt_handlers=[(evt.EVT_ACSE_RECV, on_acse)],
    )
    if not assoc.is_established:
        if assoc.is_rejected:
            raise _rejection(peer, received[-1] if received else None)
        if assoc.rejected_contexts and not assoc.accepted_contexts:
            refused = ", ".join(
                sorted({sop_classes.describe(str(cx.abstract_syntax)) for cx in assoc.rejected_contexts})
            )
            raise ContextNotAccepted(f"{peer} accepts none of the presentation contexts proposed ({refused})")
        raise AssociationFailed(f"could not associate with {peer} (unreachable, aborted or timed out)")
    return assoc


def _rejection(peer: Peer, primitive: object) -> AssociationRejected:
    """PS3.8 Table 9-21: result 1 is rejected-permanent, 2 rejected-transient; the reason says why."""
    result = getattr(primitive, "result", None)
    if result is None:
        return AssociationRejected(f"{peer} rejected the association", permanent=False)
    what = f"{primitive.result_str} by {primitive.source_str}: {primitive.reason_str}"  # type: ignore[attr-defined]
    return AssociationRejected(f"{peer} rejected the association ({what})", permanent=result == 1)


def echo(
    peer: Peer, *, calling_ae: str = "PACS_TRIAGE", tls: TlsClient | None = None, timeout: float = 30.0
) -> int:
    """C-ECHO the peer; returns the response status (0x0000 is success)."""
    ae = _ae(calling_ae, timeout)
    ae.add_requested_context(sop_classes.VERIFICATION)
    assoc = _associate(ae, peer, tls)
    try:
        rsp = assoc.send_c_echo()
        if "Status" not in rsp:
            raise AssociationFailed(f"{peer} gave no C-ECHO response (timeout or abort)")
        return int(rsp.Status)
    finally:
        assoc.release()


def collect_files(paths: Iterable[Path]) -> list[Path]:
    """Files named, and every file under folders named, in a stable order."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        else:
            found.append(path)
    return found


@dataclass(frozen=True)
class _Prepared:
    path: Path
    sop_class: str
    sop_instance: str
    transfer_syntax: str


def _prepare(path: Path) -> _Prepared | SendResult:
    try:
        ds = dcmread(path, stop_before_pixels=True)
        meta = ds.file_meta
        prepared = _Prepared(
            path=path,
            sop_class=str(meta.MediaStorageSOPClassUID),
            sop_instance=str(meta.MediaStorageSOPInstanceUID),
            transfer_syntax=str(meta.TransferSyntaxUID),
        )
        in_data_set = (str(ds.get("SOPClassUID", "")), str(ds.get("SOPInstanceUID", "")))
    except (InvalidDicomError, AttributeError, OSError, ValueError, EOFError) as exc:
        return SendResult(path, None, f"not sent: not a readable DICOM Part 10 file ({exc})")
    # The request's UIDs come from the file meta (the data set is sent byte for byte); PS3.10 7.1
    # says they equal the data set's. A file where they differ would be refused by any receiver
    # (PS3.4 B.2.3: A900) or, worse, stored under the wrong UID: name it instead of sending it.
    for what, in_meta, in_ds in (
        ("SOP Class UID", prepared.sop_class, in_data_set[0]),
        ("SOP Instance UID", prepared.sop_instance, in_data_set[1]),
    ):
        if in_meta != in_ds:
            return SendResult(
                path,
                None,
                f"not sent: {path} has {what} {in_ds or '(empty)'} in its data set but {in_meta} in "
                f"its file meta (PS3.10 7.1); correct the file (e.g. dcmodify) and send it again",
                prepared.sop_instance,
            )
    return prepared


def _batches(items: list[_Prepared]) -> Iterator[tuple[list[tuple[str, str]], list[_Prepared]]]:
    """Split files into groups whose (SOP class, transfer syntax) pairs fit one association."""
    contexts: list[tuple[str, str]] = []
    batch: list[_Prepared] = []
    for item in items:
        key = (item.sop_class, item.transfer_syntax)
        if key not in contexts:
            if len(contexts) == MAX_CONTEXTS:
                yield contexts, batch
                contexts, batch = [], []
            contexts.append(key)
        batch.append(item)
    if batch:
        yield contexts, batch


def send_files(
    peer: Peer,
    paths: Iterable[Path],
    *,
    calling_ae: str = "PACS_TRIAGE",
    tls: TlsClient | None = None,
    timeout: float = 60.0,
) -> Iterator[SendResult]:
    """C-STORE every file (sent byte-for-byte in its own transfer syntax); yields one result per file."""
    prepared: list[_Prepared] = []
    for path in collect_files(paths):
        item = _prepare(path)
        if isinstance(item, SendResult):
            yield item
        else:
            prepared.append(item)
    for contexts, batch in _batches(prepared):
        ae = _ae(calling_ae, timeout)
        for sop_class, ts in contexts:
            ae.add_requested_context(sop_class, ts)
        pending = list(batch)
        while pending:
            # A peer may abort after a bad file; the rest go on a new association.
            try:
                assoc = _associate(ae, peer, tls)
            except AssociationFailed as exc:
                for item in pending:
                    yield SendResult(item.path, None, f"not sent: {exc}", item.sop_instance)
                break
            try:
                while pending and assoc.is_established:
                    yield _send_one(assoc, pending.pop(0))
            finally:
                if assoc.is_established:
                    assoc.release()


def store_file(
    peer: Peer,
    path: Path,
    *,
    calling_ae: str = "PACS_TRIAGE",
    tls: TlsClient | None = None,
    timeout: float = 60.0,
) -> SendResult:
    """C-STORE one file on its own association: the peer's status, or ``status`` None when no
    response came (timeout, abort). Raises :class:`AssociationFailed` (or :class:`AssociationRejected`)
    when there was no association, :class:`ContextNotAccepted` when the peer refused the object's
    SOP class / transfer syntax (a :class:`AssociationFailed` too), ``ValueError`` when the file is
    not readable DICOM.
    """
    item = _prepare(path)
    if isinstance(item, SendResult):
        raise ValueError(f"{path}: {item.comment}")
    ae = _ae(calling_ae, timeout)
    ae.add_requested_context(item.sop_class, item.transfer_syntax)
    assoc = _associate(ae, peer, tls)
    try:
        return _send_one(assoc, item)
    finally:
        if assoc.is_established:
            assoc.release()


def _accepted(assoc: Association, item: _Prepared) -> bool:
    return any(
        cx.abstract_syntax == item.sop_class and cx.transfer_syntax[0] == item.transfer_syntax
        for cx in assoc.accepted_contexts
    )


def _send_one(assoc: Association, item: _Prepared) -> SendResult:
    if not assoc.is_established:
        return SendResult(item.path, None, "not sent: association lost", item.sop_instance)
    if not _accepted(assoc, item):
        return SendResult(
            item.path,
            None,
            f"not sent: peer accepted no context for {sop_classes.describe(item.sop_class)} "
            f"in {item.transfer_syntax}",
            item.sop_instance,
        )
    try:
        rsp = assoc.send_c_store(item.path)
    except (ValueError, AttributeError, OSError) as exc:
        return SendResult(item.path, None, f"not sent: {exc}", item.sop_instance)
    if "Status" not in rsp:
        return SendResult(item.path, None, "no response (timeout or abort)", item.sop_instance)
    return SendResult(item.path, int(rsp.Status), str(rsp.get("ErrorComment", "")), item.sop_instance)
