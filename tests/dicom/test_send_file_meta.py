"""`pacs-triage send` names a file whose file meta disagrees with its data set (issue 11 item 17).

The request's SOP Class/Instance UIDs come from the file meta (the data set is sent byte for
byte), so such a file reached the receiver as a mismatch and came back as A900 with nothing
said about which file was wrong. Now it is not sent: the line names the file, the attribute
and both values (PS3.10 7.1); consistent files in the same run are sent as before.
"""

from __future__ import annotations

from pathlib import Path

from pydicom.uid import UID, generate_uid

from tests.paths import TESTDATA
from tests.support.dicom_bytes import read_quietly
from tests.support.service import ServiceFactory
from tests.support.stored import stored_instances

REFERENCE = TESTDATA / "transfer_syntaxes" / "mr_small_explicit_le_REF.dcm"
MALFORMED = TESTDATA / "malformed"


def test_send_refuses_and_names_a_file_whose_meta_disagrees(
    sqlite_services: ServiceFactory, tmp_path: Path
) -> None:
    svc = sqlite_services()
    good = read_quietly(REFERENCE)
    bad = read_quietly(REFERENCE)
    bad.SOPInstanceUID = generate_uid()  # the data set says one instance, the meta another
    bad.file_meta.MediaStorageSOPInstanceUID = UID(str(good.SOPInstanceUID))
    folder = tmp_path / "files"
    folder.mkdir()
    good.save_as(folder / "a_good.dcm")
    bad.save_as(folder / "b_meta_disagrees.dcm")

    out = svc.cli("send", "--calling-ae", "META_SCU", "--timeout", "20", svc.address, str(folder))
    assert out.returncode == 1, out.stdout + out.stderr
    lines = {line.split()[2]: line for line in out.stdout.splitlines()}
    assert lines[str(folder / "a_good.dcm")].startswith("OK     0x0000")
    refused = lines[str(folder / "b_meta_disagrees.dcm")]
    assert refused.startswith("FAILED ------"), refused
    assert "SOP Instance UID" in refused and str(bad.SOPInstanceUID) in refused, refused
    assert str(good.SOPInstanceUID) in refused and "file meta" in refused, refused
    assert "1 sent, 1 failed" in out.stderr
    assert set(stored_instances(svc.database_url)) == {str(good.SOPInstanceUID)}

    # The shipped example of a class mismatch (meta CT, data set MR): named, not sent.
    out = svc.cli("send", svc.address, str(MALFORMED / "11_sop_class_mismatch_meta_vs_dataset.dcm"))
    assert out.returncode == 1
    assert "not sent" in out.stdout and "SOP Class UID" in out.stdout, out.stdout
