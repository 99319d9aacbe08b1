"""A stored instance read back: what ``storage.recovery`` needs to record it again (issue 15).

The receiver's own checks (``daemon.dicom.validation``) run again on the file, with the file meta
group in place of the C-STORE request and its presentation context (the receiver wrote both from
them), so a file is recorded again only as the receiver would have recorded it.
"""

from __future__ import annotations

import struct
from io import BytesIO

from pydicom import dcmread
from pydicom.uid import UID
from pynetdicom.dsutils import decode

from daemon.dicom import sop_classes
from daemon.dicom.errors import ReceiveError
from daemon.dicom.validation import check_request_uids, validate_received
from storage.recording import IncomingInstance

_GROUP_LENGTH_VALUE = 140  # preamble, DICM, (0002,0000) UL tag and length: its value's offset


def describe_stored(data: bytes) -> IncomingInstance:
    """The identifying attributes of a stored Part 10 file; ValueError when it fails validation."""
    try:
        # The meta group is ours and ends where its group length says (daemon.dicom.file_meta);
        # the data set after it is the sender's, decoded as the receiver decoded it. pydicom alone
        # would take group 0002 elements a sender left in its data set for file meta.
        (length,) = struct.unpack_from("<I", data, _GROUP_LENGTH_VALUE)
        end = _GROUP_LENGTH_VALUE + 4 + length
        meta = dcmread(BytesIO(data[:end])).file_meta
        syntax = UID(str(meta.TransferSyntaxUID))
        ds = decode(BytesIO(data[end:]), syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
        sop_class, sop_instance = check_request_uids(
            meta.get("MediaStorageSOPClassUID"), meta.get("MediaStorageSOPInstanceUID")
        )
        transfer_syntax = str(meta.TransferSyntaxUID)
        return validate_received(
            ds,
            request_sop_class=sop_class,
            request_sop_instance=sop_instance,
            transfer_syntax=transfer_syntax,
            is_image=sop_classes.is_image(sop_class),
        )
    except ReceiveError as exc:
        raise ValueError(str(exc)) from exc
    except Exception as exc:  # pydicom raises many kinds of error on a damaged file
        raise ValueError(f"cannot be read as DICOM: {exc}") from exc
