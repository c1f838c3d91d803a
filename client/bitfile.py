"""Bitstream files with the client's optional *source* record in the header extension area.

docs/protocol.md lets a writer put information a reader may ignore between the model id and
the CRC of the file header, without a version bump; version-1 readers (`read_bitstream`, the
server) skip it.  The client uses it for one record that makes `decode` exact:

    offset  size  field
    0       1     tag 0x01 ("source")
    1       1     length of the value in bytes (8)
    2       4     u32 sample rate of the original audio, Hz
    6       4     u32 number of samples of the original audio (at that rate)

Records are tag-length-value; a reader skips unknown tags and ignores a malformed area.
With the record, `decode` restores the original rate and exact length; without it (a file
from another writer) the decoder outputs every sample the frames determine.  The record
costs 10 bytes per file, nothing per frame.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from streaming.protocol import (
    FILE_HEADER_FIXED_SIZE,
    BitstreamHeader,
    BitstreamWriter,
    TokenFrame,
    read_bitstream,
)

__all__ = ["SourceInfo", "pack_file", "read_file_bytes", "source_info"]

TAG_SOURCE: Final = 0x01
_SOURCE = struct.Struct(">II")
_LENGTH = struct.Struct(">H")
_CRC = struct.Struct(">I")
_LENGTH_OFFSET: Final = 6
_ID_LENGTH_OFFSET: Final = 21


@dataclass(frozen=True)
class SourceInfo:
    """The original audio a file was encoded from: `rate` (Hz) and `samples` (count)."""

    rate: int
    samples: int


def _with_extension(data: bytes, extension: bytes) -> bytes:
    """`data` (a complete file) with `extension` appended to its header's extension area."""
    length = _LENGTH.unpack_from(data, _LENGTH_OFFSET)[0]
    body = bytearray(data[: length - _CRC.size])
    body += extension
    _LENGTH.pack_into(body, _LENGTH_OFFSET, len(body) + _CRC.size)
    return bytes(body) + _CRC.pack(zlib.crc32(body)) + data[length:]


def pack_file(
    header: BitstreamHeader, frames: Sequence[TokenFrame], source: SourceInfo | None
) -> bytes:
    """A complete bitstream file of `frames`, with the source record when given."""
    writer = BitstreamWriter(header)
    writer.add_frames(frames)
    data = writer.finalize()
    if source is None:
        return data
    record = bytes([TAG_SOURCE, _SOURCE.size]) + _SOURCE.pack(source.rate, source.samples)
    return _with_extension(data, record)


def source_info(data: bytes) -> SourceInfo | None:
    """The source record of a file whose header already passed `decode_file_header`, or None."""
    length = _LENGTH.unpack_from(data, _LENGTH_OFFSET)[0]
    pos = FILE_HEADER_FIXED_SIZE + data[_ID_LENGTH_OFFSET]
    end = length - _CRC.size
    while pos + 2 <= end:
        tag, size = data[pos], data[pos + 1]
        value = data[pos + 2 : pos + 2 + size]
        if len(value) < size:
            return None
        if tag == TAG_SOURCE and size == _SOURCE.size:
            rate, samples = _SOURCE.unpack(value)
            return SourceInfo(rate, samples) if rate > 0 else None
        pos += 2 + size
    return None


def read_file_bytes(data: bytes) -> tuple[BitstreamHeader, list[TokenFrame], SourceInfo | None]:
    """Parse a bitstream file: header, frames and the optional source record.

    Raises `streaming.protocol.ProtocolError` for a malformed file.
    """
    header, frames = read_bitstream(data)
    return header, frames, source_info(data)
