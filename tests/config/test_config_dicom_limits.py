"""``[dicom]`` limits that bound hostile peers (issue 11 items 6 and 8): defaults, and refusals that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import ConfigError, load_config
from daemon.dicom.hardening import PDU_MARGIN, ConnectionLimits


def _environ(tmp_path: Path, **dicom: str) -> dict[str, str]:
    return {
        "PACS_TRIAGE_HOME": str(tmp_path),
        **{f"PACS_TRIAGE_DICOM__{k.upper()}": v for k, v in dicom.items()},
    }


def test_defaults_bound_every_connection(tmp_path: Path) -> None:
    limits = ConnectionLimits.from_config(load_config(environ=_environ(tmp_path)).dicom)
    assert limits.max_pdu_size == 4 * 2**20
    assert limits.max_pdu_length == 4 * 2**20 + PDU_MARGIN
    assert (limits.max_pending_per_address, limits.max_pending_connections) == (16, 128)
    assert limits.acse_timeout == 30


def test_unlimited_pdu_size_is_refused_with_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(environ=_environ(tmp_path, max_pdu_size="0"))
    message = str(refused.value)
    assert "max_pdu_size" in message and "4194304" in message


@pytest.mark.parametrize(
    ("key", "value"),
    [("max_pending_per_address", "0"), ("max_pending_connections", "0"), ("max_pdu_size", "1024")],
)
def test_out_of_range_limits_name_the_key(tmp_path: Path, key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config(environ=_environ(tmp_path, **{key: value}))
