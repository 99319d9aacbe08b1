"""Values a VR forbids get the same defined refusal on SQLite and PostgreSQL (issue 11 item 4).

NUL inside a string and an IS beyond 32 bits were accepted by SQLite but made PostgreSQL fail
(0x0110 and a traceback in the log): validation must decide before the database does.
PS3.5 6.2: character strings hold no NUL (only UI pads with one); IS is -2^31 .. 2^31 - 1.
"""

from __future__ import annotations

import copy

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.paths import TESTDATA
from tests.support.dicom_bytes import associate, echo_on, encode_dataset, raw_c_store, read_quietly
from tests.support.service import Service
from tests.support.stored import spool_objects, stored_instances

REFERENCE = TESTDATA / "transfer_syntaxes" / "mr_small_explicit_le_REF.dcm"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
C000 = 0xC000

REFUSED: dict[str, dict[str, object]] = {
    "NUL inside Patient ID": {"PatientID": "AB\0CD"},
    "NUL inside Series Description": {"SeriesDescription": "T1\0 axial"},
    "NUL inside Accession Number": {"AccessionNumber": "A\x0012"},
    "NUL inside Modality": {"Modality": "M\0R"},
    "Series Number 2^31": {"SeriesNumber": str(2**31)},
    "Series Number -2^31 - 1": {"SeriesNumber": str(-(2**31) - 1)},
    "Series Number 2^40": {"SeriesNumber": str(2**40)},
}
ACCEPTED: dict[str, dict[str, object]] = {
    "Patient ID padded with NUL (a common writer bug)": {"PatientID": "PADDED\0"},
    "Series Number 2^31 - 1": {"SeriesNumber": str(2**31 - 1)},
    "Series Number -2^31": {"SeriesNumber": str(-(2**31))},
}


def _variant(base: Dataset, values: dict[str, object]) -> Dataset:
    ds = copy.deepcopy(base)
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()  # each its own study: no identity conflict between them
    ds.SeriesInstanceUID = generate_uid()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def test_forbidden_values_are_refused_alike_on_both_databases(service: Service) -> None:
    base = read_quietly(REFERENCE)
    assoc = associate(service.port, [(MR_IMAGE, "1.2.840.10008.1.2.1")], calling_ae="VALUES_SCU")
    assert assoc.is_established
    accepted = set()
    try:
        for case, values in REFUSED.items():
            ds = _variant(base, values)
            rsp = raw_c_store(
                assoc, encode_dataset(ds), sop_class=MR_IMAGE, sop_instance=str(ds.SOPInstanceUID)
            )
            assert rsp.status == C000, f"{case}: {rsp}"
            assert "(PS3.5 6.2)" in rsp.comment, f"{case}: {rsp.comment}"
            assert echo_on(assoc) == 0, case
        for case, values in ACCEPTED.items():
            ds = _variant(base, values)
            rsp = raw_c_store(
                assoc, encode_dataset(ds), sop_class=MR_IMAGE, sop_instance=str(ds.SOPInstanceUID)
            )
            assert rsp.status == 0, f"{case}: {rsp}"
            accepted.add(str(ds.SOPInstanceUID))
    finally:
        assoc.release()
    assert set(stored_instances(service.database_url)) == accepted
    assert len(spool_objects(service.spool)) == len(accepted)
    log = service.log_text()
    assert "Traceback" not in log and "failed unexpectedly" not in log
