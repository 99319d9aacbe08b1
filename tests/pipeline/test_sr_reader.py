"""``pipeline.writers.sr_reader``: what the demo and the end-to-end tests read back from an SR is what was written."""

from __future__ import annotations

import datetime

import pytest

from pipeline.writers.seg import write_seg
from pipeline.writers.sr import write_sr
from pipeline.writers.sr_reader import read_sr
from tests.paths import TESTDATA
from tests.support.dicom_validators import read_headers, roundtrip, synthetic_case, volume_from_headers
from vocabulary import Priority

ABDOMEN = sorted((TESTDATA / "ct_series" / "abdomen_20").glob("*.dcm"))
WHEN = datetime.datetime(2024, 5, 6, 7, 8, 9)


@pytest.mark.parametrize("with_seg", [False, True])
def test_read_sr_returns_the_written_findings_priority_and_evidence(with_seg: bool) -> None:
    headers = read_headers(ABDOMEN)
    volume = volume_from_headers(headers)
    labels, findings = synthetic_case(volume)
    seg = (
        write_seg(labels, volume, headers, findings, input_fingerprint="reader", content_datetime=WHEN)
        if with_seg
        else None
    )
    sr = write_sr(findings, headers, volume, input_fingerprint="reader", seg=seg, content_datetime=WHEN)

    report = read_sr(roundtrip(sr))

    digits = pytest.approx  # the SR writes three significant digits
    assert [(f.identifier, f.name, f.volume_ml, f.diameter_mm) for f in report.findings] == [
        (
            f.tracking_identifier,
            f.name,
            digits(f.volume_ml, rel=5e-3),
            digits(f.largest_diameter_mm, rel=5e-3),
        )
        for f in findings.findings
    ]
    assert report.total_volume_ml() == pytest.approx(sum(f.volume_ml for f in findings.findings), rel=5e-3)
    assert report.total_volume_ml("lesion") == pytest.approx(findings.findings[1].volume_ml, rel=5e-3)
    assert [(c.name, c.probability, c.algorithm_name) for c in report.classifications] == [
        ("splenic injury", pytest.approx(0.87), "demo_ct_cls")
    ]
    assert report.priority is Priority.URGENT
    assert report.summary == findings.summary
    sources = {str(h.SOPInstanceUID) for h in headers}
    assert report.evidence == (sources | {str(seg.SOPInstanceUID)} if seg is not None else sources)
    assert (report.study_instance_uid, report.sop_instance_uid) == (
        str(sr.StudyInstanceUID),
        str(sr.SOPInstanceUID),
    )
