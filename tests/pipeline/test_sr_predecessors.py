"""A superseding report names the report it replaces (PS3.3 C.17.2, Predecessor Documents Sequence),
and stays a valid TID 1500 Comprehensive 3D SR (dciodvfy, dsrdump, highdicom)."""

from __future__ import annotations

import datetime
import io

import highdicom as hd
import pytest

from pipeline.writers.sr import PreviousReport, is_report, with_predecessors, write_sr
from tests.paths import TESTDATA
from tests.support.dicom_validators import (
    assert_dciodvfy_clean,
    assert_dsrdump_ok,
    encode,
    read_headers,
    roundtrip,
    synthetic_case,
    volume_from_headers,
)

pytestmark = [
    pytest.mark.peer,  # dciodvfy and dsrdump are real external tools
    pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent the intended person name"),
]

ABDOMEN = sorted((TESTDATA / "ct_series" / "abdomen_20").glob("*.dcm"))
WHEN = datetime.datetime(2024, 5, 6, 7, 8, 9)


def test_the_new_report_names_the_delivered_one_and_validates() -> None:
    headers = read_headers(ABDOMEN)
    volume = volume_from_headers(headers)
    _, findings = synthetic_case(volume)
    first = write_sr(findings, headers, volume, input_fingerprint="first-input", content_datetime=WHEN)
    second = write_sr(
        findings, headers, volume, input_fingerprint="with-late-instances", content_datetime=WHEN
    )
    assert is_report(first) and is_report(second)
    previous = PreviousReport(
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=str(first.SeriesInstanceUID),
        sop_class_uid=str(first.SOPClassUID),
        sop_instance_uid=str(first.SOPInstanceUID),
    )
    sr = with_predecessors(second, [previous])
    assert_dciodvfy_clean(sr, "superseding SR")
    assert_dsrdump_ok(sr, "superseding SR")
    decoded = roundtrip(sr)
    assert isinstance(hd.sr.srread(io.BytesIO(encode(sr))), hd.sr.Comprehensive3DSR)
    (study,) = decoded.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == first.StudyInstanceUID
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    (sop,) = series.ReferencedSOPSequence
    assert (sop.ReferencedSOPClassUID, sop.ReferencedSOPInstanceUID) == (
        first.SOPClassUID,
        first.SOPInstanceUID,
    )
    assert with_predecessors(first, []) is first and "PredecessorDocumentsSequence" not in first
