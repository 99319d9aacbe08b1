"""A RIS for tests: hl7apy's MLLP server in a thread, validating every message against HL7 v2.5
(optionally behind TLS).

It answers with the acknowledgement the test sets (AA, AE or AR with an ERR-3 code), records what
it received (raw text, control ID, the validation problems found), and can be stopped and started
again on the same port ("down and back").
"""

from __future__ import annotations

import datetime as dt
import ssl
import threading
from dataclasses import dataclass, field

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.mllp import AbstractHandler, MLLPServer
from hl7apy.parser import parse_message

from tests.support.peers import free_port
from tests.support.threaded_server import ThreadedPeer

MESSAGE_TYPES = ("ORU^R01^ORU_R01", "OMI^O23^OMI_O23", "ORM^O01^ORM_O01")


@dataclass(frozen=True)
class Received:
    message_type: str
    control_id: str
    text: str
    problems: str  # "" when the message is valid v2.5

    def segments(self, name: str) -> list[list[str]]:
        """The fields of every ``name`` segment (index = HL7 field number; MSH shifted to match)."""
        out = []
        for line in self.text.split("\r"):
            fields = line.split("|")
            if fields[0] == name:
                out.append(["MSH", "|", *fields[1:]] if name == "MSH" else fields)
        return out


def validate_v25(text: str) -> str:
    """Problems hl7apy finds in ``text`` (strict parsing; structure too, except ORM^O01's choice
    group, which hl7apy models as if every alternative were required)."""
    try:
        message = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
        if message.msh.msh_12.to_er7() != "2.5":
            return f"MSH-12 is {message.msh.msh_12.to_er7()!r}, not 2.5"
        if not text.split("|")[8].startswith("ORM^O01"):
            message.validate()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


@dataclass
class MllpPeer(ThreadedPeer):
    """The RIS. ``answer``: (MSA-1, ERR-3 code or None)."""

    port: int = field(default_factory=free_port)
    answer: tuple[str, int | None] = ("AA", None)
    tls: ssl.SSLContext | None = None  # a server context: MLLP over TLS
    received: list[Received] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def reply(self, text: str) -> str:
        message_type = text.split("|")[8] if text.count("|") > 9 else "?"
        control_id = text.split("|")[9] if text.count("|") > 9 else ""
        with self._lock:
            self.received.append(Received(message_type, control_id, text, validate_v25(text)))
            code, error = self.answer
        now = dt.datetime.now(dt.UTC).strftime("%Y%m%d%H%M%S")
        segments = [
            f"MSH|^~\\&|RIS|HOSP|PACS_TRIAGE||{now}||ACK^{message_type.split('^')[1]}^ACK|A{control_id}|P|2.5",
            f"MSA|{code}|{control_id}" + ("|refused by the test" if code != "AA" else ""),
        ]
        if error is not None:
            segments.append(f"ERR|||{error}^test error^HL70357|E")
        return "\x0b" + "\r".join(segments) + "\r\x1c\r"

    def start(self) -> None:
        peer = self

        class Handler(AbstractHandler):  # type: ignore[misc]
            def reply(self) -> str:
                return peer.reply(self.incoming_message)

        self._serve(
            MLLPServer("127.0.0.1", self.port, {t: (Handler,) for t in MESSAGE_TYPES}, timeout=5),
            "mllp-peer",
            self.tls,
        )

    def messages(self, prefix: str = "") -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.message_type.startswith(prefix)]
