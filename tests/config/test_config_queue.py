"""The queue's configuration sections: typed, validated, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import ConfigError, load_config
from daemon.pipelines.registry import check_routing
from vocabulary import Priority


def config_from(tmp_path: Path, toml: str, **env: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "c.toml"
    path.write_text(toml)
    return load_config(path, {"PACS_TRIAGE_HOME": str(tmp_path), **env})


def test_defaults_need_no_config(tmp_path: Path) -> None:
    config = load_config(environ={"PACS_TRIAGE_HOME": str(tmp_path)})
    assert config.completion.quiet_seconds <= 10 and config.completion.idle_timeout_seconds <= 120
    assert [r.pipeline for r in config.routing.rules] == ["echo"]
    assert config.all_destinations == () and config.workers.count == 1
    check_routing(config)


def test_destination_variable_sets_one_default_destination(tmp_path: Path) -> None:
    config = load_config(
        environ={"PACS_TRIAGE_HOME": str(tmp_path), "PACS_TRIAGE_DESTINATION": "PACS@10.1.2.3:104"}
    )
    (dest,) = config.all_destinations
    assert (dest.name, dest.ae_title, dest.host, dest.port, dest.peer) == (
        "default",
        "PACS",
        "10.1.2.3",
        104,
        "PACS@10.1.2.3:104",
    )
    assert config.destinations_for("default") == (dest,)


def test_rules_and_destinations(tmp_path: Path) -> None:
    config = config_from(
        tmp_path,
        """
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "pacs.example.org"
port = 104

[[destinations]]
name = "viewer"
ae_title = "VIEWER"
host = "::1"
port = 11112

[[routing.rules]]
name = "ct-chest"
pipeline = "echo"
priority = "stat"
modality = ["ct"]
destinations = ["viewer"]
""",
        PACS_TRIAGE_WORKERS__LEASE_SECONDS="2",
    )
    (rule,) = config.routing.rules
    assert (rule.modality, rule.job_priority) == (("CT",), Priority.STAT)
    assert [d.name for d in config.destinations_for("ct-chest")] == ["viewer"]
    assert config.destinations_for("ct-chest")[0].peer == "VIEWER@[::1]:11112"
    assert [d.name for d in config.destinations_for("gone")] == ["pacs", "viewer"]
    assert config.workers.lease_seconds == 2 and config.workers.heartbeat_interval == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ("[completion]\nquiet_seconds = 90\n", {}, "completion: quiet_seconds (90.0) must not exceed"),
        (
            '[[routing.rules]]\nname = "r"\npipeline = "echo"\nseries_description = "(["\n',
            {},
            "routing.rules.0.series_description: '([' is not a valid regular expression",
        ),
        (
            '[[routing.rules]]\nname = "r"\npipeline = "echo"\npriority = "asap"\n',
            {},
            "routing.rules.0.priority",
        ),
        (
            '[[routing.rules]]\nname = "r"\npipeline = "echo"\ndestinations = ["nowhere"]\n',
            {},
            "unknown destination(s) nowhere",
        ),
        ("", {"PACS_TRIAGE_WORKERS__HEARTBEAT_SECONDS": "90"}, "heartbeat_seconds (90.0) must be shorter"),
        ("[dispatch]\nbackoff = {base_seconds = 10, max_seconds = 1}\n", {}, "dispatch.backoff: max_seconds"),
        (
            '[[destinations]]\nname = "bad name"\nae_title = "X"\nhost = "h"\nport = 1\n',
            {},
            "destinations.0.name",
        ),
    ],
)
def test_invalid_values_name_the_key(tmp_path: Path, toml: str, env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from(tmp_path, toml, **env)
    assert message in str(info.value)


def test_unknown_pipeline_refused_at_start(tmp_path: Path) -> None:
    config = config_from(tmp_path, '[[routing.rules]]\nname = "r"\npipeline = "monai_spleen"\n')
    with pytest.raises(ConfigError, match=r"unknown pipeline 'monai_spleen'; known: (\w+, )*echo, noop"):
        check_routing(config)
