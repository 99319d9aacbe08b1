"""Where configuration values come from: an explicit file and an explicit environment mapping."""

from __future__ import annotations

import os
from collections.abc import Iterator, MutableMapping
from pathlib import Path

import pytest

from daemon.config import ConfigError, Source, load, load_config
from daemon.config.report import MASK, mask, mask_text


class _UntouchableEnviron(MutableMapping[str, str]):
    """Stands in for ``os.environ`` while loading: reading is fine, any change is a failure."""

    def __init__(self, data: dict[str, str]) -> None:
        self._data = data
        self.armed = False  # pytest itself writes PYTEST_CURRENT_TEST between phases

    def __getitem__(self, key: str) -> str:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __setitem__(self, key: str, value: str) -> None:
        if not self.armed:
            self._data[key] = value
            return
        raise AssertionError(f"loading the configuration set os.environ[{key!r}]")

    def __delitem__(self, key: str) -> None:
        if not self.armed:
            del self._data[key]
            return
        raise AssertionError(f"loading the configuration deleted os.environ[{key!r}]")


def test_loading_never_changes_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: load_config cleared os.environ and refilled it around each call (not thread-safe)."""
    environ = _UntouchableEnviron({**os.environ, "PACS_TRIAGE_PORT": "4242"})
    monkeypatch.setattr(os, "environ", environ)
    environ.armed = True
    try:
        config = load_config(environ={"PACS_TRIAGE_HOME": str(tmp_path), "PACS_TRIAGE_AE_TITLE": "GIVEN"})
        assert load_config(environ={}).port == 11112
        assert load_config(environ=None).port == 4242  # the default: a snapshot of os.environ
    finally:
        environ.armed = False
    assert (config.home, config.ae_title, config.port) == (tmp_path, "GIVEN", 11112)  # os.environ not read


def test_environment_wins_over_the_file_key_by_key(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("port = 2000\n[workers]\ncount = 3\nbackoff = { base_seconds = 7, factor = 3 }\n")
    loaded = load(path, {"PACS_TRIAGE_PORT": "3000", "PACS_TRIAGE_WORKERS__BACKOFF__BASE_SECONDS": "2"})
    config, where = loaded.config, loaded.provenance
    assert (config.port, config.workers.count) == (3000, 3)
    assert (config.workers.backoff.base_seconds, config.workers.backoff.factor) == (2.0, 3.0)
    assert where.origin(("port",)).detail == "PACS_TRIAGE_PORT"
    assert where.origin(("workers", "count")).source is Source.FILE
    assert where.origin(("workers", "backoff", "factor")).detail == str(path)
    assert where.origin(("workers", "backoff", "base_seconds")).source is Source.ENVIRONMENT
    assert where.origin(("dicom", "max_associations")).source is Source.DEFAULT


def test_lists_and_tables_come_from_the_environment_as_json(tmp_path: Path) -> None:
    loaded = load(
        None,
        {
            "PACS_TRIAGE_HOME": str(tmp_path),
            "PACS_TRIAGE_ACCESS__ALLOW": '[{"ae_title": "PACS", "network": "10.1.0.0/16"}]',
            "PACS_TRIAGE_WORKERS__BACKOFF": '{"jitter": 0}',
        },
    )
    (entry,) = loaded.config.access.allow
    assert (entry.ae_title, entry.network, loaded.config.workers.backoff.jitter) == ("PACS", "10.1.0.0/16", 0)
    assert loaded.provenance.origin(("access", "allow", 0, "network")).detail == "PACS_TRIAGE_ACCESS__ALLOW"
    assert loaded.provenance.origin(("workers", "backoff", "jitter")).detail == "PACS_TRIAGE_WORKERS__BACKOFF"
    assert (
        loaded.provenance.origin(("workers", "backoff", "factor")).source is Source.DEFAULT
    )  # not in the JSON
    with pytest.raises(
        ConfigError, match=r"PACS_TRIAGE_ACCESS__ALLOW: access.allow is a list or table: give it as JSON"
    ):
        load_config(environ={"PACS_TRIAGE_ACCESS__ALLOW": "PACS@10.1.0.0/16"})
    with pytest.raises(ConfigError, match=r"PACS_TRIAGE_ACCESS__ALLOW__0: access.allow is a list or a value"):
        load_config(environ={"PACS_TRIAGE_ACCESS__ALLOW__0": "x"})


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "PACS_TRIAGE_PROT",
            "PACS_TRIAGE_PROT: unknown environment variable, there is no key 'prot' (did you mean PACS_TRIAGE_PORT?",
        ),
        ("PACS_TRIAGE_DATABASE", "PACS_TRIAGE_DATABASE: unknown environment variable"),
        (
            "PACS_TRIAGE_DICOMM__RECEIVERS",
            "PACS_TRIAGE_DICOMM__RECEIVERS: unknown environment variable, there is no key 'dicomm'",
        ),
        ("PACS_TRIAGE_DICOM__RECIEVERS", "dicom.recievers: unknown key"),
    ],
)
def test_a_misspelt_variable_is_refused_not_ignored(tmp_path: Path, name: str, message: str) -> None:
    """Before: PACS_TRIAGE_PROT=104 was silently ignored and the node listened on 11112."""
    with pytest.raises(ConfigError) as info:
        load_config(environ={"PACS_TRIAGE_HOME": str(tmp_path), name: "4"})
    assert message in str(info.value)
    assert name in str(info.value)


def test_variables_that_are_not_settings_are_left_alone(tmp_path: Path) -> None:
    config = load_config(
        environ={
            "PACS_TRIAGE_HOME": str(tmp_path),
            "PACS_TRIAGE_CONFIG": "/etc/pacs-triage.toml",  # read by the CLI for --config
            "PACS_TRIAGE_TEST_PG": "postgresql://x@y/z",  # the test suite's
            "OTHER_PORT": "1",
        }
    )
    assert config.port == 11112


def test_errors_name_the_source_of_the_bad_value(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[completion]\nquiet_seconds = 90\n[dicom]\nreceivers = 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {"PACS_TRIAGE_PORT": "-1"})
    text = str(info.value)
    assert "port: Input should be greater than or equal to 0 [set in PACS_TRIAGE_PORT]" in text
    assert f"dicom.receivers: Input should be greater than or equal to 1 [set in {path}]" in text
    assert (
        f"completion: quiet_seconds (90.0) must not exceed idle_timeout_seconds (60.0) [set in {path}]"
        in text
    )


def test_secrets_are_masked() -> None:
    assert (
        mask_text("postgresql+psycopg://triage:pa:ss@db:5432/t")
        == f"postgresql+psycopg://triage:{MASK}@db:5432/t"
    )
    assert mask_text("sqlite:////var/lib/x.db") == "sqlite:////var/lib/x.db"
    assert mask_text("postgresql://triage@db/t") == "postgresql://triage@db/t"
    assert mask(("http", "tokens", 0, "token"), "abcdefabcdefabcdef") == MASK
    assert mask(("smtp", "password"), None) is None
    assert mask(("tls", "private_key"), "/etc/tls/key.pem") == "/etc/tls/key.pem"  # a path, not a secret
