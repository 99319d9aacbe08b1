"""A SOP instance received again: same bytes -> success, nothing new; new bytes -> replaced, series changed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from daemon.dicom.scu import send_files
from tests.paths import TESTDATA
from tests.support.dicom_bytes import associate, content_digest, dataset_bytes, pause_reactor, read_quietly
from tests.support.service import Service
from tests.support.stored import assert_spool_consistent, events, spool_objects, stored_instances

SOURCE = TESTDATA / "ct_series" / "gantry_tilt" / "GE_01.dcm"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def altered_copy(tmp_path: Path) -> Path:
    """The same SOP instance (same UIDs) with one pixel and a comment changed."""
    ds = read_quietly(SOURCE)
    pixels = ds.pixel_array.copy()
    pixels[0, 0] = np.int16(pixels[0, 0]) + 1
    ds.PixelData = pixels.tobytes()
    ds.ImageComments = "corrected by the modality"
    path = tmp_path / "altered.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def send_one(service: Service, path: Path) -> int | None:
    (result,) = send_files(service.peer, [path], calling_ae="DUPLICATE_SCU")
    return result.status


def test_duplicates_and_replacements(service: Service, tmp_path: Path) -> None:
    uid = str(read_quietly(SOURCE, stop_before_pixels=True).SOPInstanceUID)
    assert send_one(service, SOURCE) == 0
    first = stored_instances(service.database_url)[uid]
    files_after_first = set(spool_objects(service.spool))
    assert len(files_after_first) == 1

    # Identical bytes, new association: success, nothing new.
    assert send_one(service, SOURCE) == 0
    # ...and twice more on one association (the receiver's fast path for a known series).
    assoc = associate(service.port, [(CT_IMAGE, EXPLICIT_LE)], calling_ae="DUPLICATE_SCU")
    try:
        for _ in range(2):
            pause_reactor(assoc)
            assert assoc.send_c_store(SOURCE).Status == 0
    finally:
        assoc.release()
    assert stored_instances(service.database_url) == {uid: first}
    assert set(spool_objects(service.spool)) == files_after_first
    assert not [e for e in events(service.database_url) if e[2] == "instance_replaced"]

    # Different bytes, same UIDs: replaced, the series marked changed, the old file gone, audited.
    altered = altered_copy(tmp_path)
    assert send_one(service, altered) == 0
    second = stored_instances(service.database_url)[uid]
    assert len(stored_instances(service.database_url)) == 1
    assert second.sha256 == content_digest(service.spool / second.path)[0] != first.sha256
    assert second.path != first.path
    assert not (service.spool / first.path).exists()
    assert set(spool_objects(service.spool)) == {second.path}
    assert dataset_bytes(service.spool / second.path) == dataset_bytes(altered)
    assert second.series_changed and second.replaced_count == 1
    replaced = [e for e in events(service.database_url) if e[2] == "instance_replaced"]
    assert len(replaced) == 1
    assert replaced[0][0] == "series"
    assert json.loads(replaced[0][3])["sop_instance_uid"] == uid

    # The replacement again: a duplicate of the new file of record.
    assert send_one(service, altered) == 0
    assert stored_instances(service.database_url)[uid] == second

    # The original again: it replaces back (the spool never holds two files for one instance).
    assert send_one(service, SOURCE) == 0
    third = stored_instances(service.database_url)[uid]
    assert third.sha256 == first.sha256 and third.replaced_count == 2
    assert len([e for e in events(service.database_url) if e[2] == "instance_replaced"]) == 2
    rows = assert_spool_consistent(service.spool, service.database_url)
    assert set(rows) == {uid}
    assert service.status_json()["instances"] == 1
