"""Raw DICOM for receiver tests: encoded data sets, associations, hand-made C-STOREs, quiet reads."""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset

from storage.receipt import read_content

DEFAULT_AE = "PACS_TRIAGE"
VERIFICATION = "1.2.840.10008.1.1"


def dataset_bytes(path: Path) -> bytes:
    """The bytes of a Part 10 file after its preamble and file meta: the data set as encoded."""
    _meta, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def transfer_syntax_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def content_digest(path: Path) -> tuple[str, int]:
    """sha256 and size of a received instance as received: its file without the receipt elements.

    What ``instances.sha256`` and ``size_bytes`` hold (storage/receipt.py); of the whole file when
    it has no receipt. Fails on a file that is not complete (its receipt's hash does not match).
    """
    content = read_content(path.read_bytes())
    assert content is not None, f"{path} is not a complete instance file"
    return content.sha256, content.size_bytes


def encode_dataset(ds: Dataset, *, implicit_vr: bool = False, little_endian: bool = True) -> bytes:
    """Encode ``ds`` without file meta, keeping invalid values (pydicom only warns about them)."""
    buffer = DicomBytesIO()
    buffer.is_implicit_VR = implicit_vr
    buffer.is_little_endian = little_endian
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        write_dataset(buffer, ds)
    return buffer.getvalue()


def read_quietly(path: Path, **kwargs: Any) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return dcmread(path, **kwargs)


def associate(
    port: int,
    contexts: Sequence[tuple[str, str]] = (),
    *,
    called_ae: str = DEFAULT_AE,
    calling_ae: str = "TEST_SCU",
    host: str = "127.0.0.1",
    timeout: float = 20.0,
    **kwargs: Any,
) -> Association:
    """A real pynetdicom association proposing (abstract syntax, transfer syntax) pairs and echo."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    ae.add_requested_context(VERIFICATION)
    for abstract, ts in contexts:
        ae.add_requested_context(abstract, ts)
    return ae.associate(host, port, ae_title=called_ae, **kwargs)


_message_ids = itertools.count(1)


@dataclass(frozen=True)
class StoreResponse:
    status: int | None  # None: no response (DIMSE timeout or the association was lost)
    comment: str = ""


def raw_c_store(
    assoc: Association,
    data: bytes,
    *,
    sop_class: str,
    sop_instance: str,
    context: tuple[str, str] | None = None,
) -> StoreResponse:
    """Send a C-STORE whose request UIDs and data set bytes are exactly what the test says.

    pynetdicom as an SCU refuses over-long UIDs and derives the request UIDs from the data set;
    this builds the primitive itself so the receiver really gets mismatched or invalid values.
    ``context`` (abstract syntax, transfer syntax) picks the presentation context; by default
    the one for ``sop_class`` in Explicit VR Little Endian.
    """
    abstract, ts = context or (sop_class, "1.2.840.10008.1.2.1")
    cx = next(
        (c for c in assoc.accepted_contexts if c.abstract_syntax == abstract and c.transfer_syntax[0] == ts),
        None,
    )
    assert cx is not None, f"no accepted context for {abstract} in {ts}"
    req = C_STORE()
    req.MessageID = next(_message_ids) % 0xFFFF or 1
    req.Priority = 2
    # The public setters validate; the private fields are what the message is built from.
    req._affected_sop_class_uid = UID(sop_class)
    req._affected_sop_instance_uid = UID(sop_instance)
    req.DataSet = io.BytesIO(data)
    pause_reactor(assoc)  # as Association.send_c_store does, but without its race (see pause_reactor)
    try:
        # The response echoes the request's UID; let our own pynetdicom decode it whatever it is.
        with warnings.catch_warnings(), lenient_uids():
            warnings.simplefilter("ignore", UserWarning)
            assert cx.context_id is not None
            assoc.dimse.send_msg(req, cx.context_id)
            _cx_id, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    if rsp is None:
        return StoreResponse(None)
    status = getattr(rsp, "Status", None)
    return StoreResponse(None if status is None else int(status), str(getattr(rsp, "ErrorComment", "") or ""))


def pause_reactor(assoc: Association) -> None:
    """Stop the association's reactor thread from taking messages off the DIMSE queue.

    pynetdicom's send_* methods clear the reactor checkpoint and wait for ``_is_paused``; right
    after a previous send that flag is still set from the last pause although the reactor was just
    woken, so it can take the next response off the queue ("unexpected service message") and the
    caller waits for its DIMSE timeout. Waiting until the reactor really blocks on the checkpoint
    (an un-notified waiter) closes that window; the send_* method then finds it paused.
    """
    checkpoint = assoc._reactor_checkpoint
    checkpoint.clear()
    deadline = time.monotonic() + 10
    while not (assoc._is_paused and checkpoint._cond._waiters):  # type: ignore[attr-defined]
        if not assoc.is_alive() or time.monotonic() > deadline:
            return  # no reactor to pause (association ended); the send fails on its own
        time.sleep(0.0001)


def echo_on(assoc: Association) -> int | None:
    """C-ECHO on an existing association (proves it survived what was sent before)."""
    pause_reactor(assoc)
    rsp = assoc.send_c_echo()
    return int(rsp.Status) if "Status" in rsp else None


def echo_status(
    port: int, *, host: str = "127.0.0.1", called_ae: str = DEFAULT_AE, timeout: float = 5.0, **kwargs: Any
) -> int | None:
    """C-ECHO status, or None when no association could be established."""
    assoc = associate(port, called_ae=called_ae, host=host, timeout=timeout, **kwargs)
    if not assoc.is_established:
        return None
    try:
        rsp = assoc.send_c_echo()
        return int(rsp.Status) if "Status" in rsp else None
    finally:
        assoc.release()


@contextlib.contextmanager
def lenient_uids() -> Iterator[None]:
    """Let this process's pynetdicom build and decode DIMSE messages with any UID (even > 64 chars)."""
    from pynetdicom import _config

    with pynetdicom_config(VALIDATORS={**_config.VALIDATORS, "UI": lambda _value: (True, "")}):
        yield


@contextlib.contextmanager
def pynetdicom_config(**values: Any) -> Iterator[None]:
    """Flip pynetdicom's module-level switches for the block only (they are process-global)."""
    from pynetdicom import _config

    saved = {k: getattr(_config, k) for k in values}
    for key, value in values.items():
        setattr(_config, key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(_config, key, value)
