"""The shared vocabulary: one triage priority and one syntax for UIDs, sha256 pins and AE titles."""

from __future__ import annotations

from typing import get_args

import pytest

from vocabulary import (
    MAX_UID_LENGTH,
    Priority,
    PriorityName,
    is_sha256_hex,
    is_valid_uid,
    validate_ae_title,
)


def test_priority_values_are_what_the_database_stores_and_order_the_queue() -> None:
    assert [(p.name, int(p)) for p in Priority] == [("ROUTINE", 0), ("URGENT", 1), ("STAT", 2)]
    assert Priority.STAT > Priority.URGENT > Priority.ROUTINE


def test_priority_names_as_configs_and_the_api_spell_them() -> None:
    assert get_args(PriorityName) == ("routine", "urgent", "stat")
    assert [Priority.from_name(name) for name in get_args(PriorityName)] == list(Priority)
    assert Priority.from_name(" Stat ") is Priority.STAT
    with pytest.raises(ValueError, match=r"unknown priority 'critical': choose one of routine, urgent, stat"):
        Priority.from_name("critical")


@pytest.mark.parametrize("uid", ["1.2.840.10008.1.1", "0", "2.25.0", "1." + "2" * (MAX_UID_LENGTH - 2)])
def test_valid_uids(uid: str) -> None:
    assert is_valid_uid(uid)


@pytest.mark.parametrize(
    "uid",
    ["", "1.02.3", "1..2", ".1", "1.", "1.2.a", "1.2 ", "1." + "2" * (MAX_UID_LENGTH - 1), None, 12],
)
def test_invalid_uids(uid: object) -> None:
    assert not is_valid_uid(uid)


def test_sha256_is_64_lower_case_hex_digits() -> None:
    digest = "0123456789abcdef" * 4
    assert is_sha256_hex(digest)
    assert not is_sha256_hex(digest.upper())  # callers normalise with .strip().lower() first
    assert not is_sha256_hex(digest[:-1])
    assert not is_sha256_hex(digest + "\n")
    assert not is_sha256_hex("g" * 64)


def test_ae_titles() -> None:
    assert validate_ae_title("  PACS_TRIAGE ") == "PACS_TRIAGE"
    assert validate_ae_title("A" * 16) == "A" * 16
    for bad, message in (
        ("", "1 to 16"),
        ("A" * 17, "1 to 16"),
        ("A\\B", "backslash"),
        ("A\tB", "printable"),
    ):
        with pytest.raises(ValueError, match=message):
            validate_ae_title(bad)
