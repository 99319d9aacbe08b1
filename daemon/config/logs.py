"""``[logging]``: how much the service says, in which format, and how loud the libraries may be."""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator

from daemon.config.base import _Section

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _level(value: str) -> str:
    upper = value.upper()
    if upper not in LEVELS:
        raise ValueError(f"must be one of {', '.join(LEVELS)}")
    return upper


class LoggingConfig(_Section):
    """One line per event on stderr (journald keeps it under systemd)."""

    level: str = "INFO"  # DEBUG, INFO, WARNING, ERROR: our own lines
    # text: "TIME LEVEL logger: message key=value"; json: one JSON object per line (timestamp,
    # level, logger, event, job_id/study_id/association_id/delivery_id where they apply, exception)
    format: Literal["text", "json"] = "text"
    # Libraries (pynetdicom, highdicom, MONAI, uvicorn's access log, APScheduler, Alembic...) log at
    # this level or above only; their INFO is chatter (288 of 361 worker lines in one run).
    third_party_level: str = "WARNING"

    @field_validator("level", "third_party_level")
    @classmethod
    def _levels(cls, value: str) -> str:
        return _level(value)
