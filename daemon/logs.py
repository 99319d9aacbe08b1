"""Logging for every process: structlog over the standard library, text or JSON, one line per event.

Every line carries the ids of what it is about where they apply (``job_id``, ``study_id``,
``association_id``, ``delivery_id``), bound for a stretch of work with :func:`bound_ids`; no
Patient Name or ID is ever logged, and at INFO a raw UID is replaced by its :func:`ref` (a
safety net under the call sites, which use ``ref`` themselves). Libraries' INFO chatter is held
at ``logging.third_party_level`` (WARNING by default).

Also the two helpers every log call with peer data goes through (issue 11 item 9):
:func:`peer_text` for any string a peer chose (AE titles, UIDs, addresses, error texts quoting
them), so a newline cannot forge a log line, and :func:`ref` for identifiers that must not appear
raw at INFO (UIDs; Patient Name/ID are never logged at all).
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

PEER_TEXT_LIMIT = 96  # characters of a peer string kept in a log line (AE 16, UI 64, plus room)
# Loggers of libraries held at logging.third_party_level.
THIRD_PARTY = (
    "pynetdicom",
    "highdicom",
    "monai",
    "ignite",
    "torch",
    "uvicorn",
    "uvicorn.access",
    "uvicorn.error",
    "fastapi",
    "apscheduler",
    "alembic",
    "httpx",
    "httpcore",
    "asyncio",
    "multipart",
    "PIL",
    "matplotlib",
    "filelock",
    "urllib3",
)
# A DICOM UID (PS3.5 9.1) has components separated by dots; five or more components is never an
# IPv4 address or a version number.
_UID = re.compile(r"(?<![\w.])[0-9]+(?:\.[0-9]+){4,}(?![\w.])")
IDS = ("job_id", "study_id", "association_id", "delivery_id")


def _hide_uids(_logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """At INFO, a UID anywhere in the line becomes ``uid:<ref>``."""
    if event.get("level", method) != "info":
        return event
    for key, value in event.items():
        if isinstance(value, str) and key not in ("timestamp", "logger", "level"):
            event[key] = _UID.sub(lambda m: "uid:" + ref(m.group(0)), value)
    return event


def _text(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> str:
    """``TIME LEVEL logger: message key=value ...`` (the text format)."""
    head = f"{event.pop('timestamp', '')} {event.pop('level', '').upper():<7} {event.pop('logger', '')}: "
    message = escape_controls(str(event.pop("event", "")))
    exception = event.pop("exception", None)
    extra = escape_controls(" ".join(f"{k}={v}" for k, v in event.items()))
    line = head + message + (f"  [{extra}]" if extra else "")
    # Issue 11 item 9: a record is one line starting at column 0; a traceback (whose message may
    # quote a peer) follows indented, so no text a peer chose can start a line of its own.
    return line + ("\n" + _indented(exception) if exception else "")


# C0 and C1 control characters, DEL and the Unicode line/paragraph separators: what can end a line.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_CONTROLS.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t", 0x2028: "\\u2028", 0x2029: "\\u2029"})


def escape_controls(text: str) -> str:
    """``text`` with every character that could end or hide a log line escaped (the rest kept)."""
    return text.translate(_CONTROLS)


def _indented(text: str) -> str:
    return "\n".join("  " + escape_controls(line) for line in text.splitlines())


def _formatter(log_format: str) -> logging.Formatter:
    """The structlog pipeline as a standard-library formatter (text or JSON)."""
    import structlog

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _hide_uids,
    ]
    renderer: Any = structlog.processors.JSONRenderer() if log_format == "json" else _text
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )


class _LazyFormatter(logging.Formatter):
    """Builds the structlog formatter at the first record: a quick command that logs nothing (``status``)
    never pays structlog's import (a tenth of a second)."""

    def __init__(self, log_format: str) -> None:
        super().__init__()
        self.log_format = log_format
        self._inner: logging.Formatter | None = None

    def format(self, record: logging.LogRecord) -> str:
        if self._inner is None:
            self._inner = _formatter(self.log_format)
        return self._inner.format(record)


class LoggingSettings(Protocol):
    """What logging needs from ``[logging]`` (``daemon.config.LoggingConfig`` has it; this room sits
    below the configuration, so it names the shape, not the class)."""

    @property
    def level(self) -> str: ...
    @property
    def format(self) -> str: ...
    @property
    def third_party_level(self) -> str: ...


@dataclass(frozen=True)
class _Plain:
    level: str
    format: str = "text"
    third_party_level: str = "WARNING"


def setup_logging(settings: LoggingSettings | str) -> None:
    """Send every log record (ours and the libraries') through structlog to stderr, once per process.

    ``settings``: the ``[logging]`` section, or just a level (text format, libraries at WARNING).
    """
    config = _Plain(level=settings) if isinstance(settings, str) else settings
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LazyFormatter(config.format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config.level)
    logging.captureWarnings(True)  # Python warnings (pydicom's quote peer values) through the same format
    library_level = max(logging.getLevelName(config.third_party_level), logging.getLevelName(config.level))
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(library_level)
    if "pynetdicom" in sys.modules:  # else the receiver calls quiet_pynetdicom when it starts
        quiet_pynetdicom()


def quiet_pynetdicom() -> None:
    """Unless pynetdicom's DEBUG is wanted, stop it formatting per-message summaries nobody sees.

    It formats them even when they are not shown: measured -5 % CPU per instance. Imported lazily:
    pynetdicom (and pydicom under it) would cost the quick commands a fifth of a second.
    """
    if logging.getLogger("pynetdicom").getEffectiveLevel() > logging.DEBUG:
        from pynetdicom import _config as pynetdicom_config

        pynetdicom_config.LOG_HANDLER_LEVEL = "none"


def bind_ids(**ids: object) -> None:
    """Add ids (``job_id=...``) to every line this thread logs from now on (None values are skipped)."""
    import structlog.contextvars

    structlog.contextvars.bind_contextvars(**{k: v for k, v in ids.items() if v is not None})


def unbind_ids(*names: str) -> None:
    import structlog.contextvars

    structlog.contextvars.unbind_contextvars(*names)


@contextmanager
def bound_ids(**ids: object) -> Iterator[None]:
    """The ids on every line logged inside the block (this thread, and threads started with its context)."""
    import structlog.contextvars

    present = {k: v for k, v in ids.items() if v is not None}
    with structlog.contextvars.bound_contextvars(**present):
        yield


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
