"""Configuration and the operator's commands, through the real ``pacs-triage`` executable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from sqlalchemy import text
from typer.testing import CliRunner

from daemon.cli.main import app
from daemon.dicom.scu import send_files
from storage.db import make_engine
from storage.migrate import head_revision
from tests.paths import TESTDATA
from tests.support.dicom_bytes import echo_status
from tests.support.peers import free_port
from tests.support.process import clean_env, run_cli
from tests.support.service import ServiceFactory
from tests.support.stored import spool_objects, stored_instances

SLICE = TESTDATA / "ct_series" / "gantry_tilt" / "GE_03.dcm"

# (case, TOML text or None, environment, what the one message must name)
BAD_CONFIGS = [
    ("port out of range (env)", None, {"PACS_TRIAGE_PORT": "70000"}, "port"),
    ("port not a number (toml)", 'port = "eleven"\n', {}, "port"),
    ("unknown key (toml)", "[dicom]\nmax_assocations = 4\n", {}, "dicom.max_assocations: unknown key"),
    (
        "unknown key (env)",
        None,
        {"PACS_TRIAGE_DICOM__MAX_ASSOCATONS": "4"},
        "dicom.max_assocatons: unknown key",
    ),
    ("unknown section (toml)", "[colour]\nred = 1\n", {}, "colour: unknown key"),
    ("AE title too long (env)", None, {"PACS_TRIAGE_AE_TITLE": "A_TITLE_OF_17_CHR"}, "ae_title"),
    ("AE title with backslash (toml)", 'ae_title = "BAD\\\\AE"\n', {}, "ae_title"),
    (
        "bad allow-list network (toml)",
        '[[access.allow]]\nae_title = "X"\nnetwork = "10.0.0.0/33"\n',
        {},
        "access.allow.0.network",
    ),
    ("bad database URL (env)", None, {"PACS_TRIAGE_DATABASE_URL": "mysql://x/y"}, "database_url"),
    ("not TOML", "port = \n", {}, "is not valid TOML"),
]


def _bad_config_args(tmp_path: Path, toml: str | None) -> list[str]:
    if toml is None:
        return []
    (tmp_path / "bad.toml").write_text(toml)
    return ["--config", str(tmp_path / "bad.toml")]


@pytest.mark.parametrize(
    ("toml", "env", "names"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS]
)
def test_bad_config_exits_2_with_one_message_naming_the_key(
    tmp_path: Path, toml: str | None, env: dict[str, str], names: str
) -> None:
    # In-process (the same code path as the console script, without the interpreter start-up);
    # `status` loads the configuration exactly as `serve` does but cannot block if it is valid.
    result = CliRunner().invoke(
        app,
        ["status", *_bad_config_args(tmp_path, toml)],
        env={"PACS_TRIAGE_HOME": str(tmp_path / "home"), **env},
    )
    assert result.exit_code == 2, result.output
    assert names in result.stderr
    assert "Traceback" not in result.output
    assert result.stderr.count("pacs-triage:") == 1  # one message (possibly listing several keys)
    assert result.stdout == ""
    assert not (tmp_path / "home" / "pacs-triage.db").exists(), "nothing may start on a bad config"


@pytest.mark.parametrize("case", [0, 2, 9], ids=[BAD_CONFIGS[i][0] for i in (0, 2, 9)])
def test_serve_exits_2_on_bad_config(tmp_path: Path, case: int) -> None:
    _, toml, env, names = BAD_CONFIGS[case]
    out = run_cli(
        "serve",
        *_bad_config_args(tmp_path, toml),
        env=clean_env({"PACS_TRIAGE_HOME": str(tmp_path / "home"), **env}),
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    assert out.stdout == "" and names in out.stderr and "Traceback" not in out.stderr
    assert out.stderr.count("pacs-triage:") == 1


def test_missing_config_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["status", "--config", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2 and "does not exist" in result.stderr, result.output
    assert "Traceback" not in result.output


def test_environment_overrides_the_file_and_the_defaults(
    sqlite_services: ServiceFactory, tmp_path: Path, database_url: str
) -> None:
    """PACS_TRIAGE_PORT / _AE_TITLE / _HOME / _DATABASE_URL win over the TOML file."""
    toml_home = tmp_path / "toml-home"
    config = tmp_path / "pacs-triage.toml"
    config.write_text(
        f'home = "{toml_home}"\nport = {free_port()}\nae_title = "FROM_TOML"\n'
        f'database_url = "sqlite:///{toml_home / "toml.db"}"\n'
    )
    env_home = tmp_path / "env-home"
    svc = sqlite_services(config=config, home=env_home, database_url=database_url, ae_title="FROM_ENV")
    assert echo_status(svc.port, called_ae="FROM_ENV") == 0
    assert echo_status(svc.port, called_ae="FROM_TOML") is None  # rejected: not our title
    (result,) = send_files(svc.peer, [SLICE])
    assert result.ok, result
    (row,) = stored_instances(database_url).values()  # the database named by the environment
    assert set(spool_objects(env_home / "spool")) == {row.path}
    assert not toml_home.exists()
    status = svc.status_json()
    assert (status["studies"], status["series"], status["instances"]) == (1, 1, 1)
    assert isinstance(status["jobs"], dict) and all(isinstance(v, int) for v in status["jobs"].values())


def test_status_json_on_an_empty_database(tmp_path: Path, database_url: str) -> None:
    env = clean_env({"PACS_TRIAGE_HOME": str(tmp_path / "home"), "PACS_TRIAGE_DATABASE_URL": database_url})
    # status is read-only (issue 12 item 8): the schema comes from `db upgrade` (or serve), not from it.
    assert run_cli("status", "--json", env=env).returncode == 1
    assert run_cli("db", "upgrade", env=env).returncode == 0
    out = run_cli("status", "--json", env=env)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert (status["studies"], status["series"], status["instances"]) == (0, 0, 0)
    assert isinstance(status["jobs"], dict) and set(status["jobs"].values()) <= {0}


def test_db_upgrade_on_both_backends(tmp_path: Path, database_url: str) -> None:
    env = clean_env({"PACS_TRIAGE_HOME": str(tmp_path / "home"), "PACS_TRIAGE_DATABASE_URL": database_url})
    engine = make_engine(database_url)
    try:
        head = head_revision(engine)
        for _ in range(2):  # idempotent
            out = run_cli("db", "upgrade", env=env)
            assert out.returncode == 0, out.stderr
            assert f"revision {head}" in out.stdout
        with engine.connect() as conn:
            assert conn.execute(text("select version_num from alembic_version")).scalar_one() == head
    finally:
        engine.dispose()


def _command_paths(group: object, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for name, command in sorted(getattr(group, "commands", {}).items()):
        paths += _command_paths(command, (*prefix, name))
    return paths


def test_help_works_for_every_command() -> None:
    paths = _command_paths(typer.main.get_command(app))
    assert {("serve",), ("status",), ("echo",), ("send",), ("db", "upgrade")} <= set(paths)
    runner = CliRunner()
    for path in paths:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, f"{' '.join(path)} --help: {result.output}"
        assert "Usage" in result.output, path
    # ...and through the installed console script.
    out = run_cli("--help", env=clean_env())
    assert out.returncode == 0 and "serve" in out.stdout
