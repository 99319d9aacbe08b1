"""The demo's verdict lines (``daemon.demo.run.judge``): each lesion against its own truth, ROUTINE shown."""

from __future__ import annotations

from daemon.demo.run import judge
from pipeline.demo.phantom import GroundTruth, Lesion
from pipeline.writers.sr_reader import ReportedFinding, SrReport
from vocabulary import Priority

STUDY = "2.25.1"


def _truth(*lesions: Lesion) -> GroundTruth:
    return GroundTruth(
        seed=0, lesions=lesions, shape=(4, 4, 4), affine=((1.0, 0, 0, 0), (0, 1.0, 0, 0), (0, 0, 1.0, 0), (0, 0, 0, 1.0)),
        organ="liver", organ_centre_lps=(0.0, 0.0, 0.0), organ_semi_axes_mm=(80.0, 60.0, 70.0), organ_hu=60.0,
        noise_sd_hu=10.0, study_instance_uid=STUDY, series_instance_uid="2.25.2", frame_of_reference_uid="2.25.3",
    )  # fmt: skip


def _lesion(label: int, centre: tuple[float, float, float], ml: float) -> Lesion:
    return Lesion(
        label, centre, (10.0, 10.0, 10.0), ((1.0, 0, 0), (0, 1.0, 0), (0, 0, 1.0)), 10.0, ml, 1, ml, -50.0
    )


def _report(priority: Priority, *findings: ReportedFinding) -> SrReport:
    return SrReport("2.25.9", "2.25.8", STUDY, findings, (), priority, "", frozenset({"2.25.5"}))


def test_routine_is_printed_as_routine_not_none() -> None:
    verdict = judge(_report(Priority.ROUTINE), _truth(), frozenset({"2.25.5"}), 0.15)
    (line,) = [line for line in verdict.lines if line.startswith("triage priority")]
    assert "ROUTINE" in line.split()[2:3] and "none" not in line and verdict.ok


def test_each_lesion_is_judged_against_its_own_truth() -> None:
    """Issue 13 item 3: 24.3 + 3.46 mL were one "lesion 25.4 mL"; the total hid a missed small lesion."""
    truth = _truth(_lesion(1, (0.0, 0.0, 0.0), 24.3), _lesion(2, (60.0, 0.0, 0.0), 3.46))
    big = ReportedFinding("lesion 1", 24.0, 40.0, centroid_lps=(1.0, 0.0, 0.0))
    small = ReportedFinding("lesion 2", 3.3, 18.0, centroid_lps=(59.0, 1.0, 0.0))
    assert judge(_report(Priority.STAT, big, small), truth, frozenset({"2.25.5"}), 0.15).ok
    merged = ReportedFinding("lesion 1", 25.4, 40.0, centroid_lps=(10.0, 0.0, 0.0))  # within 15 % in total
    verdict = judge(_report(Priority.STAT, merged), truth, frozenset({"2.25.5"}), 0.15)
    assert not verdict.ok and any("MISSED" in line for line in verdict.lines)
    too_small = ReportedFinding("lesion 2", 2.0, 18.0, centroid_lps=(59.0, 1.0, 0.0))
    verdict = judge(_report(Priority.STAT, big, too_small), truth, frozenset({"2.25.5"}), 0.15)
    assert not verdict.ok and any("OUTSIDE" in line for line in verdict.lines)
