"""Logging set-up for the CLI: one line per event on stderr, quiet library internals.

Also the two helpers every log call with peer data goes through (issue 11 item 9):
:func:`peer_text` for any string a peer chose (AE titles, UIDs, addresses, error texts quoting
them), so a newline cannot forge a log line, and :func:`ref` for identifiers that must not appear
raw at INFO (UIDs; Patient Name/ID are never logged at all).
"""

from __future__ import annotations

import hashlib
import logging

from pynetdicom import _config as pynetdicom_config

PEER_TEXT_LIMIT = 96  # characters of a peer string kept in a log line (AE 16, UI 64, plus room)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        force=True,
    )
    if level != "DEBUG":
        # pynetdicom logs every PDU and DIMSE message at INFO; our own log says what happened.
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        # ...and formats per-message summaries even when not shown; measured -5 % CPU per instance.
        pynetdicom_config.LOG_HANDLER_LEVEL = "none"


def peer_text(value: object, limit: int = PEER_TEXT_LIMIT) -> str:
    """``value`` as one printable-ASCII line: control characters, backslashes and non-ASCII escaped.

    ``"A\\nFORGED"`` logs as ``A\\nFORGED`` on the same line; over ``limit`` characters it is cut
    and ends with ``...``. Use it for every string a peer chose, however it reached us.
    """
    text = str(value).encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def ref(identifier: object) -> str:
    """A short, stable stand-in for a UID (or any identifier) in logs: 12 hex digits of its SHA-256.

    The same UID always gives the same reference, so log lines can be correlated (and ``pacs-triage
    status`` shows the UIDs to those allowed to see them) without the raw value at INFO.
    """
    return hashlib.sha256(str(identifier).encode("utf-8", "surrogateescape")).hexdigest()[:12]
