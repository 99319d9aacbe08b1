"""HL7 v2 destinations: MLLP (optionally over TLS) to a RIS, a reading worklist or an interface engine.

Sends what the outbox row says (``Outgoing.content``): ``hl7_oru`` the ORU^R01 result,
``hl7_priority`` the order update (``order_message``: OMI^O23 or ORM^O01), each built from the
job's SR (``hl7_messages.py``), one message per connection, and waits for the acknowledgement.
The message control ID is fixed by the result (a re-send is the same message).

How the acknowledgement maps (HL7 v2.5 chapter 2: §2.9 acknowledgment modes, §2.15.8 MSA: MSA-1
acknowledgment code, table 0008; §2.15.5 ERR: ERR-3 HL7 error code, table 0357):

* ``AA`` / ``CA`` (application / commit accept): delivered.
* ``AE`` (application error: the receiver found an error in the message's content): Permanent,
  except ERR-3 206 "application record locked" and 207 "application internal error" (the
  receiver's own trouble: Transient) and 205 "duplicate key identifier" (it already has this
  message: delivered, noted).
* ``AR`` (application reject: the receiver cannot take this kind of message, or cannot process
  it now): Permanent when ERR-3 says why for good (200 unsupported message type, 201 unsupported
  event code, 202 unsupported processing ID, 203 unsupported version ID, 100-104 malformed);
  otherwise (no ERR, 206, 207, anything else) Transient, since receivers use AR when their back end
  is down. ``CR`` / ``CE`` (commit reject / error, enhanced mode) map like AR.
* The error codes are read from ERR-3 (v2.5) and, from older receivers, ERR-1 component 4 and
  MSA-6, every repetition.
* An ACK whose MSA-2 is not our control ID, an unreadable answer, no answer within
  ``timeout_seconds``, a refused or dropped connection: Transient.
* Our TLS files broken, the SR unreadable: Permanent.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from daemon.config import Content, DestinationConfig
from daemon.delivery.base import Accepted, Outgoing, Permanent, Transient
from daemon.delivery.hl7_messages import Header, order_update, oru_r01
from daemon.delivery.report import ResultReport, load_report, stable_id
from daemon.delivery.tls import client_context

PERMANENT_ON_REJECT = frozenset({100, 101, 102, 103, 104, 200, 201, 202, 203})
TRANSIENT_ON_ERROR = frozenset({206, 207})
DUPLICATE = 205
ACK_CODES = ("AA", "AE", "AR", "CA", "CE", "CR")
T = TypeVar("T")


def _hl7() -> tuple[Callable[..., Any], type[Exception]]:
    try:
        import hl7  # noqa: F401
        from hl7.mllp import InvalidBlockError, open_hl7_connection
    except ImportError as exc:
        raise Permanent(
            "HL7 destinations need the python-hl7 package: install the 'hl7' extra "
            "(pip install 'pacs-triage[hl7]'), restart, then `pacs-triage deliveries retry`"
        ) from exc
    return open_hl7_connection, InvalidBlockError


class Hl7Destination:
    """A RIS (or interface engine) that takes HL7 v2.5 over MLLP."""

    def __init__(self, config: DestinationConfig, calling_ae: str) -> None:
        self.config = config
        self.name = config.name
        self.header = Header(
            sending_application=config.sending_application,
            sending_facility=config.sending_facility,
            receiving_application=config.receiving_application,
            receiving_facility=config.receiving_facility,
            processing_id=config.processing_id,
        )

    def __str__(self) -> str:
        return self.config.peer

    def message(self, report: ResultReport, content: str) -> tuple[str, str]:
        """(control ID, message) for ``content`` of ``report``: the same on every attempt."""
        if content == Content.HL7_ORU:
            control_id = stable_id(report, content)
            return control_id, oru_r01(report, self.header, control_id)
        if content == Content.HL7_PRIORITY:
            control_id = stable_id(report, f"{content}|{self.config.order_message}")
            return control_id, order_update(report, self.header, control_id, self.config.order_message)
        raise Permanent(
            f"destination {self.name!r} is an HL7 destination and cannot send {content or 'DICOM objects'!r}; "
            "list only hl7_oru / hl7_priority for it"
        )

    def send(self, item: Outgoing) -> Accepted:
        control_id, text = self.message(load_report(item.path), item.content)
        ack = self._exchange(text)
        return interpret(ack, control_id, peer=str(self))

    def check(self) -> None:
        """Open (and close) a connection, TLS handshake included; sends nothing."""
        context = self._tls()

        async def connect() -> None:
            _reader, writer = await asyncio.open_connection(
                self.config.host, self.config.port, ssl=context, server_hostname=self._sni(context)
            )
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()

        self._run(connect())

    # -- the wire ---------------------------------------------------------------------------------

    def _tls(self) -> ssl.SSLContext | None:
        return client_context(self.config) if self.config.tls else None

    def _sni(self, context: ssl.SSLContext | None) -> str | None:
        return self.config.host if context is not None else None

    def _exchange(self, text: str) -> Ack:
        open_connection, invalid_block = _hl7()
        context = self._tls()

        async def exchange() -> Ack:
            reader, writer = await open_connection(
                self.config.host,
                self.config.port,
                encoding="utf-8",
                ssl=context,
                server_hostname=self._sni(context),
            )
            try:
                writer.writemessage(text)
                await writer.drain()
                answer = await reader.readmessage()
            finally:
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await writer.wait_closed()
            return Ack.of(answer)

        try:
            return self._run(exchange())
        except invalid_block as exc:
            raise Transient(f"{self}: the answer is not an MLLP block ({exc})") from exc

    def _run(self, work: Coroutine[Any, Any, T]) -> T:
        try:
            return asyncio.run(asyncio.wait_for(work, self.config.timeout_seconds))
        except TimeoutError as exc:
            raise Transient(f"{self}: no acknowledgement within {self.config.timeout_seconds:g} s") from exc
        except ssl.SSLError as exc:
            raise Transient(f"{self}: TLS handshake failed ({exc})") from exc
        except (OSError, EOFError, asyncio.IncompleteReadError) as exc:
            raise Transient(f"{self}: {type(exc).__name__}: {exc or 'connection closed'}") from exc


@dataclass(frozen=True)
class Ack:
    """The values of an acknowledgement that decide the outcome."""

    code: str  # MSA-1: AA, AE, AR (original mode); CA, CE, CR (enhanced mode, commit level)
    control_id: str  # MSA-2: the control ID of the message acknowledged
    text: str  # MSA-3, for the operator
    errors: tuple[int, ...]  # HL7 error codes (table 0357), in order, without repeats

    @classmethod
    def of(cls, message: Any) -> Ack:
        """Read MSA-1, MSA-2, MSA-3 and the HL7 error codes of a python-hl7 message: ERR-3 (v2.5),
        and from older receivers ERR-1.4 (v2.3/2.4) and MSA-6 (v2.3), every repetition."""
        try:
            msa = message.segment("MSA")
        except (KeyError, AttributeError) as exc:
            raise Transient(f"the answer has no MSA segment: {str(message)[:200]!r}") from exc
        separators = str(message.separators)  # segment, field, repetition, component, subcomponent
        repetition, component, subcomponent = separators[2], separators[3], separators[4]

        def field(segment: Any, n: int) -> str:
            return str(segment[n]) if len(segment) > n else ""

        try:
            errs = list(message.segments("ERR"))
        except KeyError:
            errs = []
        codes: list[str] = []
        for err in errs:
            codes += [rep.split(component)[0] for rep in field(err, 3).split(repetition)]
            for rep in field(err, 1).split(repetition):  # ERR-1: location^...^...^code (CE, with &)
                parts = rep.split(component)
                codes.append(parts[3].split(subcomponent)[0] if len(parts) > 3 else "")
        codes.append(field(msa, 6).split(component)[0])
        errors = tuple(dict.fromkeys(int(c) for c in codes if c.strip().isdigit()))
        return cls(field(msa, 1), field(msa, 2), field(msa, 3), errors)


def interpret(ack: Ack, control_id: str, *, peer: str) -> Accepted:
    """Delivered, or :class:`Transient` / :class:`Permanent`, by MSA-1 and ERR-3 (see the module doc)."""
    codes = ", ".join(str(c) for c in ack.errors)
    said = (
        f"{peer} answered {ack.code}"
        + (f" (ERR-3 {codes})" if codes else "")
        + (f": {ack.text}" if ack.text else "")
    )
    status = ack.errors[0] if ack.errors else 0
    if ack.code not in ACK_CODES:
        raise Transient(f"{peer}: MSA-1 {ack.code!r} is not an acknowledgement code")
    if ack.control_id != control_id:
        raise Transient(f"{peer} acknowledged {ack.control_id!r}, not our message {control_id!r}")
    if ack.code in ("AA", "CA"):
        return Accepted(status=0)
    if DUPLICATE in ack.errors:
        return Accepted(status=DUPLICATE, warning=f"{said} (already received: a re-send)")
    if ack.code == "AE":
        if ack.errors and all(c in TRANSIENT_ON_ERROR for c in ack.errors):
            raise Transient(said, status=status)
        raise Permanent(
            f"{said}; the receiver refused the message's content: fix the data or the receiver's "
            "mapping, then `pacs-triage deliveries retry`",
            status=status,
        )
    if any(c in PERMANENT_ON_REJECT for c in ack.errors):
        raise Permanent(
            f"{said}; the receiver does not take this message type, version or processing ID: "
            "check order_message / processing_id of the destination, then `pacs-triage deliveries retry`",
            status=status,
        )
    raise Transient(said, status=status)
