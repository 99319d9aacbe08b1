"""Check that a received data set is encoded as the accepted presentation context says.

pydicom reads on when the encoding differs: it switches between implicit and explicit VR by
itself and ignores bytes after the last whole element. A file stored that way is declared (in
its file meta) in one transfer syntax and encoded in another, and other readers (dcmtk, viewers,
the PACS) cannot read it. So the receiver walks the element headers of the exact bytes it
would store, before anything is acknowledged:

- PS3.5 7.1.2 / 7.1.3: each element's header is Explicit VR (tag, a VR of PS3.5 Table 6.2-1,
  a 2- or 4-byte length) or Implicit VR (tag, 4-byte length), as the transfer syntax says;
- PS3.5 7.1: tags ascend within each data set and sequence item;
- PS3.5 7.1.1 / 7.5: each value length fits in what is left, undefined lengths only where
  allowed (sequences, UN, encapsulated Pixel Data, PS3.5 A.4) and closed by their delimiter;
- the data set ends exactly at the end of the last element (no trailing bytes).

Values are not decoded; the walk reads about ten bytes per element.
"""

from __future__ import annotations

import struct
import zlib

from pydicom.uid import UID

from daemon.dicom.errors import EncodingMismatch

_VRS = frozenset(
    "AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)
_LONG_VRS = frozenset("OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())  # PS3.5 Table 7.1-1
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_MAX_DEPTH = 32
_MAX_INFLATED = 2**30  # a Deflated data set larger than this once inflated is refused (a zip bomb)


class _Walker:
    def __init__(self, data: bytes, *, implicit: bool, little: bool, syntax: str) -> None:
        self.data = data
        self.implicit = implicit
        self.order = "<" if little else ">"
        self.syntax = syntax

    def fail(self, offset: int, why: str) -> EncodingMismatch:
        # The gist first: the peer sees 64 characters of it (ErrorComment is LO).
        return EncodingMismatch(f"not {self.syntax} at byte {offset}: {why}")

    def header(self, pos: int, end: int) -> tuple[int, str | None, int, int]:
        """(tag, VR or None, value length, value offset) of the element at ``pos``."""
        if end - pos < 8:
            raise self.fail(pos, f"{end - pos} trailing bytes after the last element")
        group, element = struct.unpack_from(self.order + "HH", self.data, pos)
        tag = group << 16 | element
        if group == 0xFFFE:  # item and delimiters: no VR in any transfer syntax (PS3.5 7.5)
            return tag, None, struct.unpack_from(self.order + "L", self.data, pos + 4)[0], pos + 8
        if self.implicit:
            return tag, None, struct.unpack_from(self.order + "L", self.data, pos + 4)[0], pos + 8
        vr = self.data[pos + 4 : pos + 6].decode("latin-1")
        if vr not in _VRS:
            raise self.fail(pos, f"({group:04X},{element:04X}) has no valid VR (found {vr!r})")
        if vr in _LONG_VRS:
            if end - pos < 12:
                raise self.fail(pos, "element header cut short")
            return tag, vr, struct.unpack_from(self.order + "L", self.data, pos + 8)[0], pos + 12
        return tag, vr, struct.unpack_from(self.order + "H", self.data, pos + 6)[0], pos + 8

    def dataset(self, pos: int, end: int, depth: int, *, item: bool = False) -> int:
        """Walk elements from ``pos``; up to ``end`` or, for an undefined-length item, its delimiter."""
        if depth > _MAX_DEPTH:
            raise self.fail(pos, f"sequences nested deeper than {_MAX_DEPTH}")
        previous = -1
        while pos < end:
            tag, vr, length, value = self.header(pos, end)
            if tag == _ITEM_END and item:
                return value
            if tag in (_ITEM, _ITEM_END, _SEQUENCE_END):
                raise self.fail(pos, f"item tag ({tag >> 16:04X},{tag & 0xFFFF:04X}) outside a sequence")
            if tag <= previous:
                raise self.fail(
                    pos, f"({tag >> 16:04X},{tag & 0xFFFF:04X}) does not ascend (PS3.5 7.1): garbage bytes?"
                )
            previous = tag
            if length == _UNDEFINED:
                pos = self.undefined(pos, tag, vr, value, end, depth)
                continue
            if length > end - value:
                raise self.fail(pos, f"length {length} exceeds the {end - value} bytes left (truncated?)")
            if vr == "SQ":
                self.items(value, value + length, depth + 1, implicit_items=False)
            pos = value + length
        if item:
            raise self.fail(pos, "item without its delimiter")
        return pos

    def undefined(self, pos: int, tag: int, vr: str | None, value: int, end: int, depth: int) -> int:
        """An undefined-length element: a sequence, UN holding one (PS3.5 6.2.2), or encapsulated pixels."""
        if tag == _PIXEL_DATA and vr in (None, "OB", "OW"):
            return self.fragments(value, end)
        if vr not in (None, "SQ", "UN"):
            raise self.fail(pos, f"undefined length on a {vr} element")
        return self.items(value, end, depth + 1, implicit_items=vr == "UN", delimited=True)

    def items(self, pos: int, end: int, depth: int, *, implicit_items: bool, delimited: bool = False) -> int:
        walker = (
            _Walker(self.data, implicit=True, little=True, syntax="Implicit VR items of UN")
            if implicit_items
            else self
        )
        while pos < end:
            tag, _vr, length, value = walker.header(pos, end)
            if tag == _SEQUENCE_END and delimited:
                return value
            if tag != _ITEM:
                raise walker.fail(
                    pos, f"expected a sequence item, found ({tag >> 16:04X},{tag & 0xFFFF:04X})"
                )
            if length == _UNDEFINED:
                pos = walker.dataset(value, end, depth, item=True)
                continue
            if length > end - value:
                raise walker.fail(pos, f"item length {length} exceeds the {end - value} bytes left")
            walker.dataset(value, value + length, depth)
            pos = value + length
        if delimited:
            raise self.fail(pos, "sequence without its delimiter")
        return pos

    def fragments(self, pos: int, end: int) -> int:
        """Encapsulated Pixel Data (PS3.5 A.4): items of defined length, then the delimiter."""
        while True:
            tag, _vr, length, value = self.header(pos, end)
            if tag == _SEQUENCE_END:
                return value
            if tag != _ITEM or length == _UNDEFINED or length > end - value:
                raise self.fail(pos, "encapsulated Pixel Data fragment malformed")
            pos = value + length


def check_encoding(data: bytes, transfer_syntax: str) -> None:
    """Raise :class:`EncodingMismatch` unless ``data`` is one data set encoded in ``transfer_syntax``."""
    ts = UID(transfer_syntax)
    if ts.is_deflated:
        try:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            data = inflater.decompress(data, _MAX_INFLATED)
        except zlib.error as exc:
            raise EncodingMismatch(f"data set is not Deflate-compressed as {ts.name} says: {exc}") from exc
        if inflater.unconsumed_tail:
            raise EncodingMismatch(f"Deflated data set inflates to over {_MAX_INFLATED} bytes")
    walker = _Walker(
        data, implicit=bool(ts.is_implicit_VR), little=bool(ts.is_little_endian), syntax=ts.name or str(ts)
    )
    walker.dataset(0, len(data), 0)
