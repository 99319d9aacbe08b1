"""``deploy/pacs-triage.example.toml`` documents every key of the schema, and loads; ``pacs-triage
config check`` (the real executable) shows it with sources and masked secrets, or names the bad key."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

from daemon.config import load_config
from daemon.config.report import schema_keys
from tests.paths import REPO
from tests.support.process import clean_env, run_cli

EXAMPLE = REPO / "deploy" / "pacs-triage.example.toml"
# A commented-out setting: "# key = value" or "# [section]" / "# [[list.of.tables]]" (prose is anything else).
COMMENTED_SETTING = re.compile(r"^# ?(?P<body>\[\[?[a-z_.]+\]\]?\s*(#.*)?|[a-z][a-z_0-9]* = .*)$")
ASSIGNMENT = re.compile(r"^[a-z][a-z_0-9]* = ")
STRING = re.compile(r'"[^"]*"')


def _uncommented(text: str) -> str:
    """The example with every commented-out setting switched on."""
    lines = []
    for line in text.splitlines():
        match = COMMENTED_SETTING.match(line)
        lines.append(match.group("body") if match else line)
    return "\n".join(lines) + "\n"


def _keys(value: Any, prefix: str = "") -> set[str]:
    """Dotted keys of TOML data; the items of a list of tables share their keys (no index)."""
    if isinstance(value, dict) and value and prefix.rsplit(".", 1)[-1] != "overrides":
        return {k for key, v in value.items() for k in _keys(v, f"{prefix}.{key}" if prefix else key)}
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return {k for v in value for k in _keys(v, prefix)}
    return {prefix}


def test_the_example_loads_and_its_values_are_the_defaults() -> None:
    example = load_config(EXAMPLE, environ={})
    defaults = load_config(environ={"PACS_TRIAGE_HOME": str(example.home)})
    assert example.model_dump() == defaults.model_dump()


def test_the_example_documents_every_key_of_the_schema() -> None:
    documented = _keys(tomllib.loads(_uncommented(EXAMPLE.read_text(encoding="utf-8"))))
    schema = set(schema_keys())
    assert not schema - documented, f"keys missing from {EXAMPLE.name}: {sorted(schema - documented)}"
    assert not documented - schema, (
        f"{EXAMPLE.name} documents keys that do not exist: {sorted(documented - schema)}"
    )


def test_every_setting_in_the_example_has_a_comment() -> None:
    lines = _uncommented(EXAMPLE.read_text(encoding="utf-8")).splitlines()
    bare = [
        line
        for previous, line in zip(["", *lines], lines, strict=False)
        if ASSIGNMENT.match(line) and "#" not in STRING.sub("", line) and not previous.startswith("#")
    ]
    assert not bare, f"settings without a comment (on the line, or a comment line above): {bare}"


def test_the_schema_walk_finds_nested_keys() -> None:
    """The key list the example is checked against reaches into sections, lists of tables and tables."""
    keys = set(schema_keys())
    assert {"port", "dicom.max_associations", "access.allow.network", "workers.backoff.jitter"} <= keys
    assert {
        "routing.rules.priority",
        "pipelines.monai.segmentation.sha256",
        "pipelines.monai.thresholds.labels",
    } <= keys
    assert "dicom" not in keys and "routing.rules" not in keys


def test_a_missing_key_is_noticed(tmp_path: Path) -> None:
    """The documentation check fails on an example that lacks a key (the check itself can fail)."""
    text = EXAMPLE.read_text(encoding="utf-8")
    pruned = "\n".join(line for line in text.splitlines() if not line.startswith("max_pdu_size"))
    assert "dicom.max_pdu_size" in set(schema_keys()) - _keys(tomllib.loads(_uncommented(pruned)))


def test_config_check_shows_sources_and_masks_secrets(tmp_path: Path) -> None:
    env = clean_env(
        {
            "PACS_TRIAGE_PORT": "11113",
            "PACS_TRIAGE_DATABASE_URL": "postgresql://pacs:s3cr3t-pw@db.example.org/pacs",
            "PACS_TRIAGE_TEST_ANYTHING": "ignored: the test suite's prefix",
        }
    )
    out = run_cli("config", "check", "--config", str(EXAMPLE), env=env)
    assert out.returncode == 0, out.stderr
    assert "configuration is valid" in out.stdout
    rows = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines() if line and line[0] != " "}
    assert rows["home"] == ['"/var/lib/pacs-triage"', "file"]
    assert rows["port"] == ["11113", "environment", "PACS_TRIAGE_PORT"]
    assert rows["dicom.max_associations"] == ["16", "file"]
    assert rows["storage.spool_dir"] == ["null", "default"]
    assert rows["database_url"] == [
        '"postgresql://pacs:********@db.example.org/pacs"',
        "environment",
        "PACS_TRIAGE_DATABASE_URL",
    ]
    assert "s3cr3t-pw" not in out.stdout + out.stderr
    assert "/var/lib/pacs-triage/spool" in out.stdout  # derived: the spool under home

    out = run_cli("config", "check", "--config", str(EXAMPLE), "--json", env=env)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    settings = {s["key"]: s for s in report["settings"]}
    assert settings["port"] == {
        "key": "port",
        "value": 11113,
        "source": "environment",
        "from": "PACS_TRIAGE_PORT",
    }
    assert settings["logging.level"]["source"] == "file" and settings["logging.level"]["from"] == str(EXAMPLE)
    assert report["derived"]["database"] == "postgresql://pacs:********@db.example.org/pacs"
    assert report["environment"] == ["PACS_TRIAGE_DATABASE_URL", "PACS_TRIAGE_PORT"]


def test_config_check_names_the_bad_key(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text(
        EXAMPLE.read_text(encoding="utf-8").replace("max_associations = 16", "max_associations = 0"),
        encoding="utf-8",
    )
    out = run_cli("config", "check", "--config", str(broken), env=clean_env())
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stdout == "" and "Traceback" not in out.stderr
    assert (
        f"dicom.max_associations: Input should be greater than or equal to 1 [set in {broken}]" in out.stderr
    )


def test_config_check_refuses_an_unknown_variable(tmp_path: Path) -> None:
    out = run_cli(
        "config", "check", env=clean_env({"PACS_TRIAGE_PROT": "104", "PACS_TRIAGE_HOME": str(tmp_path)})
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "PACS_TRIAGE_PROT: unknown environment variable" in out.stderr
    assert "did you mean PACS_TRIAGE_PORT?" in out.stderr
    assert out.stdout == ""
