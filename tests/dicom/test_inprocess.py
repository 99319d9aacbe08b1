"""The in-process receiver fixture (``daemon.service.serve.serve`` in a thread) works and stops cleanly."""

from __future__ import annotations

from daemon.dicom.scu import send_files
from tests.paths import TESTDATA
from tests.support.dicom_bytes import echo_status, read_quietly
from tests.support.service import InProcessService
from tests.support.stored import assert_spool_consistent

SLICE = TESTDATA / "mr_series" / "sag_t1_fl2d_HFS" / "0010.dcm"


def test_in_process_receiver_round_trip(inproc_service: InProcessService) -> None:
    assert echo_status(inproc_service.port) == 0
    (result,) = send_files(inproc_service.peer, [SLICE], calling_ae="INPROC_SCU")
    assert result.ok, result
    rows = assert_spool_consistent(inproc_service.spool, inproc_service.database_url)
    assert set(rows) == {str(read_quietly(SLICE, stop_before_pixels=True).SOPInstanceUID)}
