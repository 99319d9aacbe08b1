"""Destinations of every kind and what each receives, per destination and per rule (issue 13 item 13):
typed, validated, errors that name the key."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from daemon.config import Config, ConfigError, Content, load_config
from daemon.delivery.contents import SR_CLASSES, plan
from daemon.delivery.registry import check_destinations

DESTINATIONS = """
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "pacs.example.org"
port = 104

[[destinations]]
name = "ris"
kind = "hl7"
host = "ris.example.org"
port = 2575
receives = ["hl7_oru", "hl7_priority"]

[[destinations]]
name = "fhir"
kind = "fhir"
url = "https://fhir.example.org/r4/"
token = "secret-token-value"
"""


def config_from(tmp_path: Path, toml: str, **env: str) -> Config:
    path = tmp_path / "c.toml"
    path.write_text(toml)
    return load_config(path, {"PACS_TRIAGE_HOME": str(tmp_path), **env})


def test_each_kind_has_its_address_and_default_contents(tmp_path: Path) -> None:
    config = config_from(tmp_path, DESTINATIONS)
    pacs, ris, fhir = config.all_destinations
    assert [d.peer for d in (pacs, ris, fhir)] == [
        "PACS@pacs.example.org:104",
        "mllp://ris.example.org:2575",
        "https://fhir.example.org/r4",
    ]
    assert pacs.contents == (Content.SR, Content.SEG, Content.KOS, Content.KEY_IMAGES)
    assert ris.contents == (Content.HL7_ORU, Content.HL7_PRIORITY)
    assert fhir.contents == (Content.FHIR,)
    assert fhir.token is not None and "secret" not in repr(fhir)  # masked
    # every DICOM object to the PACS as before; messages from the SR only
    assert plan(pacs, pacs.contents) == [("", frozenset())]
    assert plan(ris, ris.contents) == [("hl7_oru", SR_CLASSES), ("hl7_priority", SR_CLASSES)]


def test_a_rule_says_what_one_destination_receives(tmp_path: Path) -> None:
    config = config_from(
        tmp_path,
        DESTINATIONS
        + """
[[routing.rules]]
name = "ct"
pipeline = "echo"
destinations = ["pacs", "ris"]

[[routing.rules.send]]
destination = "pacs"
receives = ["sr"]
""",
    )
    ((pacs, to_pacs), (ris, to_ris)) = config.deliveries_for("ct")
    assert (pacs.name, to_pacs) == ("pacs", (Content.SR,))
    assert (ris.name, to_ris) == ("ris", (Content.HL7_ORU, Content.HL7_PRIORITY))
    assert plan(pacs, to_pacs) == [("sr", SR_CLASSES)]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('[[destinations]]\nname = "x"\nkind = "hl7"\nhost = "h"\n', "needs port"),
        ('[[destinations]]\nname = "x"\nkind = "fhir"\n', "needs url"),
        ('[[destinations]]\nname = "x"\nhost = "h"\nport = 104\n', "needs ae_title"),
        ('[[destinations]]\nname = "x"\nkind = "fhir"\nurl = "ftp://x"\n', "must start with https://"),
        ('[[destinations]]\nname = "x"\nkind = "mllp"\nhost = "h"\nport = 1\n', "kind"),
        (
            '[[destinations]]\nname = "x"\nkind = "hl7"\nhost = "h"\nport = 1\nreceives = ["sr"]\n',
            "a 'hl7' destination cannot receive sr",
        ),
        (
            '[[destinations]]\nname = "x"\nkind = "hl7"\nhost = "h"\nport = 1\nreceives = ["hl7_orux"]\n',
            "receives",
        ),
        (
            '[[destinations]]\nname = "x"\nkind = "hl7"\nhost = "h"\nport = 1\nsending_application = "A|B"\n',
            "HL7 delimiters",
        ),
        (
            '[[routing.rules]]\nname = "r"\npipeline = "echo"\n[[routing.rules.send]]\n'
            'destination = "pacs"\nreceives = ["fhir"]\n' + DESTINATIONS,
            "a 'dicom' destination cannot receive fhir",
        ),
        (
            '[[routing.rules]]\nname = "r"\npipeline = "echo"\n[[routing.rules.send]]\n'
            'destination = "nowhere"\nreceives = ["sr"]\n',
            "unknown destination(s) nowhere",
        ),
        (
            '[[routing.rules]]\nname = "r"\npipeline = "echo"\ndestinations = ["ris"]\n[[routing.rules.send]]\n'
            'destination = "pacs"\nreceives = ["sr"]\n' + DESTINATIONS,
            "not in its destinations",
        ),
    ],
)
def test_bad_destinations_are_refused_naming_the_key(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from(tmp_path, extra)


def test_destinations_from_one_variable_as_json(tmp_path: Path) -> None:
    """The FHIR token need not be in the file: PACS_TRIAGE_DESTINATIONS carries the list as JSON."""
    value = [{"name": "fhir", "kind": "fhir", "url": "https://f.example.org", "token": "t" * 20}]
    config = config_from(tmp_path, "", PACS_TRIAGE_DESTINATIONS=json.dumps(value))
    (fhir,) = config.all_destinations
    assert fhir.token is not None and fhir.token.get_secret_value() == "t" * 20


def test_serve_and_config_check_refuse_a_destination_whose_extra_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = config_from(tmp_path, DESTINATIONS)
    check_destinations(config)  # the dev install has both extras
    monkeypatch.setitem(sys.modules, "hl7", None)
    monkeypatch.setitem(sys.modules, "httpx", None)
    with pytest.raises(ConfigError) as refused:
        check_destinations(config)
    assert str(refused.value) == (
        "destination 'ris' (kind 'hl7') needs hl7: install the 'hl7' extra (pip install 'pacs-triage[hl7]'); "
        "destination 'fhir' (kind 'fhir') needs httpx: install the 'fhir' extra (pip install 'pacs-triage[fhir]')"
    )
