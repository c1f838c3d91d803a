"""The wire and file formats of codecstream: the one module that defines them (docs/protocol.md).

Three encodings of the same codec tokens, all versioned and big-endian (network byte order):

* **frame payload**: one 20 ms frame of tokens, bit-packed MSB first as fixed by
  docs/model-interface.md: `num_codebooks` (4 bits, 1..15), `gain_index` (`gain_bits` bits),
  the low-band layout as a prefix code (`0` none, `10` layout 1, `11` layout 2), then
  `num_codebooks` codes of `code_bits` bits each, then (layouts 1 and 2 only) the Huffman-coded
  low-band indices (streaming/lowband.py).  A frame of n codebooks without low band takes
  `4 + gain_bits + 1 + n * code_bits` bits (21 bits = 1.05 kbps at 50 frames/s for n=1).
* **token packet** (one WebSocket binary message): a 14-byte header (magic, version, type,
  flags, stream id u32, sequence number u16, capture timestamp u32 in µs), an optional 12-byte
  block of profiling timestamps (flag bit 0), then exactly one frame payload padded with zero
  bits to a whole byte.
* **bitstream file**: a CRC-protected header (magic b"CSTR", model id, sample rate, frame
  size, code/gain bits, codebooks Q, frame count, then tag-length-value extension records:
  tag 1 = `SourceInfo`, the rate and length of the original audio), then all frame payloads
  as ONE continuous bit stream without per-frame byte alignment, zero-padded to a byte at the
  very end; the file size therefore measures the real bitrate.

There is also a JSON form of frames and packets for debugging and for consumers that do not
want to parse bits.

Decoding never trusts its input: every malformed input raises `ProtocolError` whose `code`
(an `ErrorCode`, a `str`) is stable and is what the server maps to WebSocket close codes.
Caller mistakes while *encoding* (a code that does not fit in `code_bits`, a seq > 65535)
raise a plain `ValueError`.

The model-dependent sizes (`code_bits`, `gain_bits`, the model's codebook count Q) come from
the model card at run time; every function takes them as parameters.  Nothing here does I/O:
formats work on `bytes`-like objects the caller read or will write.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Final, TypeAlias

import numpy as np
import numpy.typing as npt

from streaming.lowband import LAYOUTS, LOWBAND_LAYOUT_NONE, MAX_LOWBAND_BINS

__all__ = [
    "EXT_TAG_SOURCE",
    "FILE_FORMAT_VERSION",
    "FILE_FORMAT_VERSIONS",
    "FILE_HEADER_FIXED_SIZE",
    "FILE_MAGIC",
    "FLAG_TIMES",
    "LOWBAND_LAYOUT_NONE",
    "MAX_CODEBOOKS",
    "MAX_FIELD_BITS",
    "MAX_FILE_HEADER_SIZE",
    "MAX_LOWBAND_BINS",
    "MAX_MODEL_ID_BYTES",
    "PACKET_HEADER_SIZE",
    "PACKET_MAGIC",
    "PACKET_TIMES_SIZE",
    "PACKET_TYPE_FRAME",
    "PROTOCOL_VERSION",
    "UNKNOWN_FRAME_COUNT",
    "BitReader",
    "BitWriter",
    "BitstreamHeader",
    "BitstreamWriter",
    "ErrorCode",
    "FrameArrays",
    "PacketTimes",
    "ProtocolError",
    "SourceInfo",
    "TokenFrame",
    "TokenPacket",
    "decode_file_header",
    "decode_packet",
    "encode_file_header",
    "encode_packet",
    "frame_bits",
    "frame_from_json",
    "frame_stream_bits",
    "frame_to_json",
    "max_packet_size",
    "pack_frame",
    "pack_frame_stream",
    "packet_from_json",
    "packet_to_json",
    "payload_size",
    "read_bitstream",
    "read_bitstream_arrays",
    "reject_json_constant",
    "seq_add",
    "seq_diff",
    "seq_le",
    "seq_lt",
    "ts_diff",
    "unpack_frame",
    "unpack_frame_stream",
    "write_bitstream",
]

Buffer: TypeAlias = bytes | bytearray | memoryview
"""Any bytes-like input accepted by the decoders."""

Int64Array: TypeAlias = npt.NDArray[np.int64]

# --------------------------------------------------------------------------------------------
# Versions and constants
# --------------------------------------------------------------------------------------------

PROTOCOL_VERSION: Final = 2
"""Version of the token packet (byte 1 of every packet) and of the JSON form (2: low band)."""

FILE_FORMAT_VERSION: Final = 3
"""Version of the bitstream file that writers produce (byte 4 of the file; 3: each frame's
codebook count, layout and gain coded against the previous frame's)."""

FILE_FORMAT_VERSIONS: Final = (2, 3)
"""File versions readers accept (2: every frame payload as in a packet)."""

PACKET_MAGIC: Final = 0xC5
"""First byte of every token packet."""

PACKET_TYPE_FRAME: Final = 0x01
"""Packet type: one token frame.  Other values are reserved (rejected as `unknown_type`)."""

FLAG_TIMES: Final = 0x01
"""Packet flag: a 12-byte `PacketTimes` block follows the header.  Other bits must be 0."""

PACKET_HEADER_SIZE: Final = 14
"""Bytes of the fixed packet header."""

PACKET_TIMES_SIZE: Final = 12
"""Bytes of the optional profiling timestamps block (3 × u32 µs)."""

FILE_MAGIC: Final = b"CSTR"
"""First 4 bytes of a bitstream file."""

FILE_HEADER_FIXED_SIZE: Final = 22
"""Bytes of the file header before the model id (the CRC32 adds 4 after it)."""

MAX_FILE_HEADER_SIZE: Final = 1024
"""Largest `header_length` a reader accepts (bytes); larger is `oversized`."""

MAX_MODEL_ID_BYTES: Final = 64
"""Largest model id, in bytes of UTF-8."""

EXT_TAG_SOURCE: Final = 0x01
"""Tag of the file header's *source* extension record (`SourceInfo`: u32 rate, u32 samples)."""

UNKNOWN_FRAME_COUNT: Final = 0xFFFFFFFF
"""`num_frames` value of a streamed file whose length was not known when the header was written."""

MAX_CODEBOOKS: Final = 15
"""Most codebooks a frame payload can carry (the 4-bit count field; 0 is invalid)."""

NUM_CODEBOOKS_BITS: Final = 4
"""Width of the codebook count field of the frame payload, in bits."""

MAX_FIELD_BITS: Final = 16
"""Largest `code_bits` / `gain_bits` the formats support (both are at least 1)."""

_SEQ_MOD: Final = 1 << 16
_TS_MOD: Final = 1 << 32
_U32_MAX: Final = _TS_MOD - 1

_PACKET_HEADER = struct.Struct(">BBBBIHI")  # magic, version, type, flags, stream, seq, ts
_PACKET_TIMES = struct.Struct(">III")  # client send, server receive, server send
_FILE_FIXED = struct.Struct(">4sBBHIIHBBBB")
_CRC = struct.Struct(">I")
_EXT_HEAD = struct.Struct(">BB")  # extension record: tag, value length
_SOURCE = struct.Struct(">II")  # source record value: sample rate, sample count
assert _PACKET_HEADER.size == PACKET_HEADER_SIZE
assert _PACKET_TIMES.size == PACKET_TIMES_SIZE
assert _FILE_FIXED.size == FILE_HEADER_FIXED_SIZE


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class ErrorCode(StrEnum):
    """Stable reason of a `ProtocolError` (the value is what logs and clients see)."""

    TRUNCATED = "truncated"
    """The input ends before the structure it started is complete."""
    BAD_MAGIC = "bad_magic"
    """The input does not start with the packet magic byte / file magic."""
    UNKNOWN_VERSION = "unknown_version"
    """The version byte (or JSON "version") is not one this module reads."""
    UNKNOWN_TYPE = "unknown_type"
    """The packet type byte is reserved."""
    OVERSIZED = "oversized"
    """The input (or a length field in it) exceeds the allowed maximum."""
    CORRUPT = "corrupt"
    """Checksum mismatch, non-zero padding bits, inconsistent lengths, unparsable JSON."""
    BAD_FIELD = "bad_field"
    """A field holds a value outside its valid range (count 0 or > Q, reserved flag, ...)."""
    TRAILING_DATA = "trailing_data"
    """Bytes follow the end of a complete packet or file."""


class ProtocolError(ValueError):
    """Malformed input to a decoder.

    `code` is the stable `ErrorCode`; `message` the human explanation; `offset` the byte offset
    in the input where the problem was found, when there is one.  `str(error)` is
    `"<code>: <message>"`.
    """

    code: ErrorCode
    message: str
    offset: int | None

    def __init__(self, code: ErrorCode, message: str, *, offset: int | None = None) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.offset = offset

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_protocol_error, (self.code.value, self.message, self.offset))


def _rebuild_protocol_error(code: str, message: str, offset: int | None) -> ProtocolError:
    return ProtocolError(ErrorCode(code), message, offset=offset)


# --------------------------------------------------------------------------------------------
# Sequence-number and timestamp arithmetic (RFC 3550 style wraparound)
# --------------------------------------------------------------------------------------------


def seq_add(seq: int, delta: int) -> int:
    """`seq + delta` modulo 2**16 (sequence numbers are u16)."""
    return (seq + delta) & 0xFFFF


def seq_diff(a: int, b: int) -> int:
    """Signed distance `a - b` between two u16 sequence numbers, in [-32768, 32767] frames.

    `seq_diff(0, 65535) == 1`: 0 comes one frame after 65535.
    """
    d = (a - b) & 0xFFFF
    return d - _SEQ_MOD if d >= 0x8000 else d


def seq_lt(a: int, b: int) -> bool:
    """True when sequence number `a` comes before `b` (modulo 2**16)."""
    return seq_diff(a, b) < 0


def seq_le(a: int, b: int) -> bool:
    """True when `a` comes before `b` or equals it (modulo 2**16)."""
    return seq_diff(a, b) <= 0


def ts_diff(a: int, b: int) -> int:
    """Signed distance `a - b` between two u32 µs timestamps, in [-2**31, 2**31) µs.

    Timestamps wrap every 2**32 µs ≈ 71.6 minutes; differences stay exact as long as the two
    instants are less than ≈ 35.8 minutes apart.
    """
    d = (a - b) & _U32_MAX
    return d - _TS_MOD if d >= 0x80000000 else d


# --------------------------------------------------------------------------------------------
# Parameters and sizes
# --------------------------------------------------------------------------------------------


def _check_params(code_bits: int, gain_bits: int, max_codebooks: int | None = None) -> None:
    """Reject impossible model parameters (a caller bug, hence ValueError)."""
    if not 1 <= code_bits <= MAX_FIELD_BITS:
        raise ValueError(f"code_bits must be in 1..{MAX_FIELD_BITS}, got {code_bits}")
    if not 1 <= gain_bits <= MAX_FIELD_BITS:
        raise ValueError(f"gain_bits must be in 1..{MAX_FIELD_BITS}, got {gain_bits}")
    if max_codebooks is not None and not 1 <= max_codebooks <= MAX_CODEBOOKS:
        raise ValueError(f"max_codebooks must be in 1..{MAX_CODEBOOKS}, got {max_codebooks}")


def lowband_flag_bits(layout_id: int) -> int:
    """Bits of the low-band layout field: 1 for no low band (`0`), 2 for layouts 1, 2 (`1x`)."""
    return 1 if layout_id == LOWBAND_LAYOUT_NONE else 2


def frame_bits(num_codebooks: int, *, code_bits: int, gain_bits: int) -> int:
    """Bits of one frame payload without low band: `4 + gain_bits + 1 + num_codebooks * code_bits`.

    With code_bits=10, gain_bits=6: 1 codebook = 21 bits (1.05 kbps at 50 frames/s),
    12 codebooks = 131 bits.  A low band adds 1 flag bit and its Huffman code
    (`TokenFrame.bit_length`).
    """
    return NUM_CODEBOOKS_BITS + gain_bits + 1 + num_codebooks * code_bits


def payload_size(num_codebooks: int, *, code_bits: int, gain_bits: int) -> int:
    """Bytes of one frame payload without low band, padded to a whole byte (as in a packet)."""
    return (frame_bits(num_codebooks, code_bits=code_bits, gain_bits=gain_bits) + 7) >> 3


def max_lowband_bits() -> int:
    """Most bits any low band can take: flag + the longest code of every pair, any layout."""
    longest = 0
    for spec in LAYOUTS.values():
        pairs = sum(spec.pair_code(p).max_length for p in range(spec.bins // 2))
        longest = max(longest, pairs)
    return longest + 1  # the layout field is 2 bits instead of 1


def max_packet_size(
    *, code_bits: int, gain_bits: int, max_codebooks: int, with_times: bool = True
) -> int:
    """Largest valid packet, in bytes, for a model with `max_codebooks` codebooks.

    This is the default `max_bytes` of `decode_packet` (all codebooks and the longest
    possible low band).
    """
    _check_params(code_bits, gain_bits, max_codebooks)
    extra = PACKET_TIMES_SIZE if with_times else 0
    bits = frame_bits(max_codebooks, code_bits=code_bits, gain_bits=gain_bits) + max_lowband_bits()
    return PACKET_HEADER_SIZE + extra + ((bits + 7) >> 3)


# --------------------------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenFrame:
    """The tokens of one 20 ms frame (N = 320 samples at 16 kHz).

    * `num_codebooks`: codebooks kept, 1..15 (and at most the model's Q).
    * `gain_index`: scalar-quantised frame gain, in [0, 2**gain_bits).
    * `codes`: the first `num_codebooks` RVQ indices, each in [0, 2**code_bits).
    * `lowband_layout`: 0 (no low band) or a layout id of streaming/lowband.py.
    * `lowband`: that layout's `bins` quantisation indices, each in [-M, M]; () for layout 0.

    Construction checks what does not depend on the model (count 1..15, `len(codes)`,
    non-negative values, the low band against its layout) and raises ValueError; the bit
    widths are checked when packing.  `codes` and `lowband` given as any integer sequence or
    array are stored as tuples of Python ints.
    """

    num_codebooks: int
    gain_index: int
    codes: tuple[int, ...]
    lowband_layout: int = LOWBAND_LAYOUT_NONE
    lowband: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        codes = self._int_tuple("codes")
        n = self.num_codebooks
        if type(n) is not int or not 1 <= n <= MAX_CODEBOOKS:
            raise ValueError(f"num_codebooks must be an int in 1..{MAX_CODEBOOKS}, got {n!r}")
        if len(codes) != n:
            raise ValueError(f"num_codebooks is {n} but {len(codes)} codes were given")
        if type(self.gain_index) is not int or self.gain_index < 0:
            raise ValueError(f"gain_index must be a non-negative int, got {self.gain_index!r}")
        if min(codes) < 0:
            raise ValueError(f"codes must be non-negative, got {codes}")
        self._check_lowband()

    def _int_tuple(self, name: str) -> tuple[int, ...]:
        """Field `name` as a tuple of Python ints (stored back when it was not one)."""
        values = getattr(self, name)
        if type(values) is not tuple or not all(type(v) is int for v in values):
            values = tuple(int(v) for v in values)
            object.__setattr__(self, name, values)
        return values

    def _check_lowband(self) -> None:
        low = self._int_tuple("lowband")
        layout_id = self.lowband_layout
        if type(layout_id) is not int:
            if not isinstance(layout_id, (int, np.integer)) or isinstance(layout_id, bool):
                raise ValueError(f"lowband_layout must be an int, got {layout_id!r}")
            layout_id = int(layout_id)
            object.__setattr__(self, "lowband_layout", layout_id)
        if layout_id == LOWBAND_LAYOUT_NONE:
            if low:
                raise ValueError("lowband values given for lowband_layout 0")
            return
        spec = LAYOUTS.get(layout_id)
        if spec is None:
            raise ValueError(f"unknown lowband_layout {layout_id!r} (known: 0, {sorted(LAYOUTS)})")
        if len(low) != spec.bins:
            raise ValueError(f"lowband layout {layout_id} has {spec.bins} bins, got {len(low)}")
        if max(map(abs, low)) > spec.max_index:
            raise ValueError(f"a lowband index is outside [-{spec.max_index}, {spec.max_index}]")

    @classmethod
    def trusted(
        cls,
        num_codebooks: int,
        gain_index: int,
        codes: tuple[int, ...],
        lowband_layout: int = LOWBAND_LAYOUT_NONE,
        lowband: tuple[int, ...] = (),
    ) -> TokenFrame:
        """A frame built without the constructor's checks, for the encoder's own output.

        The caller guarantees what `__post_init__` would check: tuples of Python ints,
        `len(codes) == num_codebooks` in 1..15, non-negative values and a low band that fits
        its layout (the engine's argmin codes and clipped indices do).  About 7x cheaper
        than the checked constructor, which matters at 50 frames/s times hundreds of streams.
        """
        frame = object.__new__(cls)
        setattr_ = object.__setattr__
        setattr_(frame, "num_codebooks", num_codebooks)
        setattr_(frame, "gain_index", gain_index)
        setattr_(frame, "codes", codes)
        setattr_(frame, "lowband_layout", lowband_layout)
        setattr_(frame, "lowband", lowband)
        return frame

    @classmethod
    def from_codes(
        cls,
        codes: Sequence[int] | npt.NDArray[np.integer],
        gain_index: int,
        num_codebooks: int | None = None,
        lowband_layout: int = LOWBAND_LAYOUT_NONE,
        lowband: Sequence[int] | npt.NDArray[np.integer] = (),
    ) -> TokenFrame:
        """Frame from an encoder output row: `codes` [Q] int, truncated to `num_codebooks`.

        Residual VQ makes truncation exact: the first k codes do not depend on how many are
        kept.  `num_codebooks=None` keeps all of `codes`.  `lowband`: the layout's indices.
        """
        n = len(codes) if num_codebooks is None else num_codebooks
        if n > len(codes):
            raise ValueError(f"asked for {n} codebooks of a frame with {len(codes)}")
        return cls(n, int(gain_index), tuple(int(c) for c in codes[:n]), lowband_layout,
                   tuple(int(v) for v in lowband))

    def codes_array(self, num_codebooks_total: int) -> Int64Array:
        """Codes as the decoder input row: int64 [Q], zeros at and beyond `num_codebooks`."""
        if num_codebooks_total < self.num_codebooks:
            raise ValueError(
                f"frame has {self.num_codebooks} codebooks, more than Q={num_codebooks_total}"
            )
        out = np.zeros(num_codebooks_total, dtype=np.int64)
        out[: self.num_codebooks] = self.codes
        return out

    def bit_length(self, *, code_bits: int, gain_bits: int) -> int:
        """Bits of this frame's payload (without byte padding)."""
        bits = NUM_CODEBOOKS_BITS + gain_bits + self.num_codebooks * code_bits
        bits += lowband_flag_bits(self.lowband_layout)
        if self.lowband_layout != LOWBAND_LAYOUT_NONE:
            spec = LAYOUTS[self.lowband_layout]
            bits += spec.coded_bits(np.asarray(self.lowband, dtype=np.int64))
        return bits


def _write_frame(writer: BitWriter, frame: TokenFrame, code_bits: int, gain_bits: int) -> None:
    """Append the payload bits of `frame` to `writer` (ValueError when a value does not fit)."""
    acc = _check_values(frame, code_bits, gain_bits)  # before the first bit is written
    field, field_bits = _layout_field(frame.lowband_layout)
    head = (frame.num_codebooks << gain_bits) | frame.gain_index
    writer.write(head << field_bits | field, NUM_CODEBOOKS_BITS + gain_bits + field_bits)
    _write_body(writer, frame, acc, code_bits)


def _layout_field(layout_id: int) -> tuple[int, int]:
    """(value, bits) of the low-band layout field: `0` none, `10` layout 1, `11` layout 2."""
    if layout_id == LOWBAND_LAYOUT_NONE:
        return 0, 1
    return 2 | (layout_id - 1), 2


def _read_layout_field(reader: BitReader) -> int:
    """Read a low-band layout field (`_layout_field`)."""
    return 1 + reader.read(1) if reader.read(1) else LOWBAND_LAYOUT_NONE


def _write_body(writer: BitWriter, frame: TokenFrame, codes: int, code_bits: int) -> None:
    """Append the frame's codes (`codes`: packed by `_check_values`) and its low band."""
    writer.write(codes, frame.num_codebooks * code_bits)
    if frame.lowband_layout != LOWBAND_LAYOUT_NONE:
        LAYOUTS[frame.lowband_layout].encode(np.asarray(frame.lowband, dtype=np.int64), writer)


def _read_frame(reader: BitReader, code_bits: int, gain_bits: int, max_codebooks: int,
                index: int | None = None) -> TokenFrame:
    """Read one frame payload at the reader's position (`index`: frame number for messages)."""
    where = "" if index is None else f"frame {index}: "
    start = reader.position
    n = reader.read(NUM_CODEBOOKS_BITS)
    if n == 0 or n > max_codebooks:
        raise ProtocolError(
            ErrorCode.BAD_FIELD,
            f"{where}num_codebooks {n} outside 1..{max_codebooks}",
            offset=start >> 3,
        )
    gain = reader.read(gain_bits)
    layout_id = _read_layout_field(reader)
    return _read_body(reader, n, gain, layout_id, code_bits)


def _read_body(reader: BitReader, n: int, gain: int, layout_id: int,
               code_bits: int) -> TokenFrame:
    """Read the n codes and the low band that follow a frame's head."""
    value = reader.read(n * code_bits)
    mask = (1 << code_bits) - 1
    codes = [0] * n
    for i in range(n - 1, -1, -1):
        codes[i] = value & mask
        value >>= code_bits
    low: tuple[int, ...] = ()
    if layout_id != LOWBAND_LAYOUT_NONE:
        low = LAYOUTS[layout_id].decode(reader)
    return TokenFrame(n, gain, tuple(codes), layout_id, low)


class _FileContext:
    """What a version-3 file frame is coded against: the previous frame's codebook count,
    low-band layout and gain index (before the first frame: 1, none, 0)."""

    __slots__ = ("gain_index", "lowband_layout", "num_codebooks")

    def __init__(self) -> None:
        self.num_codebooks = 1
        self.lowband_layout = LOWBAND_LAYOUT_NONE
        self.gain_index = 0


_GAIN_ESCAPE: Final = 0b111


def _write_gain(writer: BitWriter, gain: int, previous: int, gain_bits: int) -> None:
    """The version-3 gain code of `gain` after `previous` (docs/protocol.md): delta 0 `00`;
    |delta| 1 `01s`; 2-3 `10sx`; 4-7 `110sxx` (s = 1 for a negative delta, x = |delta| minus
    the range's smallest); anything else `111` and the index in `gain_bits` bits."""
    delta = gain - previous
    size = abs(delta)
    sign = 1 if delta < 0 else 0
    if size == 0:
        writer.write(0b00, 2)
    elif size == 1:
        writer.write(0b010 | sign, 3)
    elif size <= 3:
        writer.write(0b1000 | sign << 1 | (size - 2), 4)
    elif size <= 7:
        writer.write(0b110000 | sign << 2 | (size - 4), 6)
    else:
        writer.write(_GAIN_ESCAPE << gain_bits | gain, 3 + gain_bits)


def _read_gain(reader: BitReader, previous: int, gain_bits: int) -> int:
    """Read a gain code (`_write_gain`); a delta wraps modulo 2**gain_bits, so every bit
    string is a valid gain."""
    if not reader.read(1):
        if not reader.read(1):
            return previous
        smallest, extra = 1, 0
    elif not reader.read(1):
        smallest, extra = 2, 1
    elif not reader.read(1):
        smallest, extra = 4, 2
    else:
        return reader.read(gain_bits)
    negative = reader.read(1)
    size = smallest + (reader.read(extra) if extra else 0)
    return (previous - size if negative else previous + size) % (1 << gain_bits)


def _check_values(frame: TokenFrame, code_bits: int, gain_bits: int) -> int:
    """The frame's codes as one integer (ValueError when a gain or code does not fit)."""
    if frame.gain_index >> gain_bits:
        raise ValueError(f"gain_index {frame.gain_index} does not fit in {gain_bits} bits")
    acc = 0
    for code in frame.codes:
        if code >> code_bits:
            raise ValueError(f"code {code} does not fit in {code_bits} bits")
        acc = (acc << code_bits) | code
    return acc


def _write_file_frame(writer: BitWriter, frame: TokenFrame, context: _FileContext,
                      code_bits: int, gain_bits: int) -> None:
    """Append `frame` as a version-3 file frame coded against `context` (then updated):
    a mode bit (`0` = the previous frame's codebook count and layout, `1` = count and layout
    field follow), the gain code, the codes, the low band."""
    acc = _check_values(frame, code_bits, gain_bits)  # before the first bit is written
    n, layout_id = frame.num_codebooks, frame.lowband_layout
    if (n, layout_id) == (context.num_codebooks, context.lowband_layout):
        writer.write(0, 1)
    else:
        field, field_bits = _layout_field(layout_id)
        writer.write((1 << NUM_CODEBOOKS_BITS | n) << field_bits | field,
                     1 + NUM_CODEBOOKS_BITS + field_bits)
    _write_gain(writer, frame.gain_index, context.gain_index, gain_bits)
    _write_body(writer, frame, acc, code_bits)
    context.num_codebooks, context.lowband_layout = n, layout_id
    context.gain_index = frame.gain_index


def _write_any(writer: BitWriter, frame: TokenFrame, context: _FileContext | None,
               code_bits: int, gain_bits: int) -> None:
    """Append `frame` as a file frame: against `context` (version 3), or alone (None:
    version 2, the packet's payload)."""
    if context is None:
        _write_frame(writer, frame, code_bits, gain_bits)
    else:
        _write_file_frame(writer, frame, context, code_bits, gain_bits)


def _read_file_frame(reader: BitReader, context: _FileContext, code_bits: int, gain_bits: int,
                     max_codebooks: int, index: int) -> TokenFrame:
    """Read one version-3 file frame coded against `context` (then updated)."""
    start = reader.position
    n, layout_id = context.num_codebooks, context.lowband_layout
    if reader.read(1):
        n = reader.read(NUM_CODEBOOKS_BITS)
        if n == 0 or n > max_codebooks:
            raise ProtocolError(
                ErrorCode.BAD_FIELD,
                f"frame {index}: num_codebooks {n} outside 1..{max_codebooks}",
                offset=start >> 3,
            )
        layout_id = _read_layout_field(reader)
    gain = _read_gain(reader, context.gain_index, gain_bits)
    context.num_codebooks, context.lowband_layout, context.gain_index = n, layout_id, gain
    return _read_body(reader, n, gain, layout_id, code_bits)


def pack_frame(frame: TokenFrame, *, code_bits: int, gain_bits: int) -> bytes:
    """Frame payload bytes: the bits MSB first, zero-padded to a whole byte.

    Size: ceil(`frame.bit_length(...)` / 8) bytes.  Raises ValueError when a value does not
    fit in its field.
    """
    _check_params(code_bits, gain_bits)
    writer = BitWriter()
    _write_frame(writer, frame, code_bits, gain_bits)
    return writer.getvalue()


def _decode_payload(
    data: Buffer, offset: int, code_bits: int, gain_bits: int, max_codebooks: int
) -> TokenFrame:
    """Decode the frame payload filling `data[offset:]` exactly (padding bits must be 0)."""
    if len(data) - offset < 1:
        raise ProtocolError(
            ErrorCode.TRUNCATED, "input ends before the frame payload", offset=offset
        )
    reader = BitReader(data, offset * 8)
    try:
        frame = _read_frame(reader, code_bits, gain_bits, max_codebooks)
    except ProtocolError as exc:
        if exc.code == ErrorCode.TRUNCATED:
            raise ProtocolError(
                ErrorCode.TRUNCATED,
                f"frame payload ends early ({len(data) - offset} bytes): {exc}",
                offset=len(data),
            ) from None
        raise
    rest = reader.remaining
    if rest >= 8:
        raise ProtocolError(
            ErrorCode.TRAILING_DATA,
            f"{rest // 8} bytes after a frame payload of {len(data) - offset - rest // 8} bytes",
            offset=(reader.position + 7) >> 3,
        )
    if rest and reader.peek(rest):
        raise ProtocolError(
            ErrorCode.CORRUPT, "non-zero padding bits after the frame payload", offset=len(data) - 1
        )
    return frame


def unpack_frame(data: Buffer, *, code_bits: int, gain_bits: int, max_codebooks: int) -> TokenFrame:
    """Decode one byte-padded frame payload (as produced by `pack_frame`).

    Raises ProtocolError: `truncated`, `bad_field` (count 0 or > `max_codebooks`),
    `trailing_data` (bytes after the payload), `corrupt` (non-zero padding bits).
    Every `gain_bits`-wide value is a valid gain index, every `code_bits`-wide value a valid
    code (docs/model-interface.md: codebook_size == 2**code_bits), and every bit string a
    valid low band (the Huffman codes are complete), so only lengths can be wrong.
    """
    _check_params(code_bits, gain_bits, max_codebooks)
    return _decode_payload(data, 0, code_bits, gain_bits, max_codebooks)


# --------------------------------------------------------------------------------------------
# Bit I/O
# --------------------------------------------------------------------------------------------


class BitWriter:
    """Append-only MSB-first bit writer over a growing byte buffer.

    Values are shifted into a Python int accumulator; whole bytes are moved to the buffer
    once 64 bits are pending, so each write costs O(width), never O(stream length).
    """

    __slots__ = ("_acc", "_buf", "_nacc")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._acc = 0
        self._nacc = 0

    @property
    def bit_length(self) -> int:
        """Bits written so far."""
        return len(self._buf) * 8 + self._nacc

    def write(self, value: int, nbits: int) -> None:
        """Append the `nbits` low bits of `value`, MSB first (`0 <= value < 2**nbits`)."""
        if nbits < 0 or value < 0 or value >> nbits:
            raise ValueError(f"value {value} does not fit in {nbits} bits")
        self._acc = (self._acc << nbits) | value
        self._nacc += nbits
        if self._nacc >= 64:
            self._flush()

    def _flush(self) -> None:
        whole, rem = divmod(self._nacc, 8)
        if whole:
            self._buf += (self._acc >> rem).to_bytes(whole, "big")
            self._acc &= (1 << rem) - 1
            self._nacc = rem

    def complete_bytes(self, start: int = 0) -> bytes:
        """The whole bytes written so far from byte `start` on (a partial last byte excluded)."""
        self._flush()
        return bytes(self._buf[start:])

    def getvalue(self) -> bytes:
        """Everything written so far, the last byte zero-padded; the writer is unchanged."""
        self._flush()
        if not self._nacc:
            return bytes(self._buf)
        return bytes(self._buf) + bytes([self._acc << (8 - self._nacc)])


class BitReader:
    """MSB-first bit reader over a bytes-like object (bits `start_bit` .. `end_bit`).

    Reading past the end raises ProtocolError(`truncated`).
    """

    __slots__ = ("_data", "_end", "_pos")

    def __init__(self, data: Buffer, start_bit: int = 0, end_bit: int | None = None) -> None:
        self._data = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        total = len(self._data) * 8
        self._end = total if end_bit is None else end_bit
        if not 0 <= start_bit <= self._end <= total:
            raise ValueError(f"bit range {start_bit}..{self._end} outside 0..{total}")
        self._pos = start_bit

    @property
    def position(self) -> int:
        """Index of the next bit to read (from the start of `data`)."""
        return self._pos

    @property
    def remaining(self) -> int:
        """Bits left before `end_bit`."""
        return self._end - self._pos

    def peek(self, nbits: int) -> int:
        """The next `nbits` bits as an unsigned int, without consuming them."""
        pos = self._pos
        stop = pos + nbits
        if nbits < 0 or stop > self._end:
            raise ProtocolError(
                ErrorCode.TRUNCATED,
                f"need {nbits} bits at bit {pos}, only {self._end - pos} left",
                offset=pos >> 3,
            )
        if nbits == 0:
            return 0
        last = (stop + 7) >> 3
        value = int.from_bytes(self._data[pos >> 3 : last], "big")
        return (value >> (last * 8 - stop)) & ((1 << nbits) - 1)

    def read(self, nbits: int) -> int:
        """Consume and return the next `nbits` bits as an unsigned int."""
        value = self.peek(nbits)
        self._pos += nbits
        return value

    def skip(self, nbits: int) -> None:
        """Consume `nbits` bits without decoding them."""
        if nbits < 0 or self._pos + nbits > self._end:
            raise ProtocolError(ErrorCode.TRUNCATED, f"cannot skip {nbits} bits at bit {self._pos}")
        self._pos += nbits


# --------------------------------------------------------------------------------------------
# Many frames at once (numpy)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class FrameArrays:
    """F frames as arrays, ready for a batched decoder step.

    * `num_codebooks`: int64 [F], each 1..Q.
    * `gain_index`: int64 [F].
    * `codes`: int64 [F, Q]; entries at and beyond a frame's `num_codebooks` are 0.
    * `lowband_layout`: int64 [F], 0 (none) or a layout id.
    * `lowband`: int64 [F, MAX_LOWBAND_BINS]: a frame's layout's indices, then zeros.

    The low-band arrays may be left out (None): frames without low band.
    """

    num_codebooks: Int64Array
    gain_index: Int64Array
    codes: Int64Array
    lowband_layout: Int64Array = None  # type: ignore[assignment]
    lowband: Int64Array = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        count = self.num_codebooks.shape[0]
        if self.lowband_layout is None:
            object.__setattr__(self, "lowband_layout", np.zeros(count, dtype=np.int64))
        if self.lowband is None:
            object.__setattr__(self, "lowband", np.zeros((count, MAX_LOWBAND_BINS), np.int64))

    def __len__(self) -> int:
        return int(self.num_codebooks.shape[0])

    @classmethod
    def from_frames(cls, frames: Sequence[TokenFrame], num_codebooks_total: int) -> FrameArrays:
        """Arrays of `frames`, codes zero-padded to Q = `num_codebooks_total` columns."""
        count = len(frames)
        n = np.fromiter((f.num_codebooks for f in frames), dtype=np.int64, count=count)
        gain = np.fromiter((f.gain_index for f in frames), dtype=np.int64, count=count)
        layouts = np.fromiter((f.lowband_layout for f in frames), dtype=np.int64, count=count)
        codes = np.zeros((count, num_codebooks_total), dtype=np.int64)
        low = np.zeros((count, MAX_LOWBAND_BINS), dtype=np.int64)
        if count and int(n.max()) > num_codebooks_total:
            raise ValueError(f"a frame has more than Q={num_codebooks_total} codebooks")
        for i, frame in enumerate(frames):
            codes[i, : frame.num_codebooks] = frame.codes
            if frame.lowband:
                low[i, : len(frame.lowband)] = frame.lowband
        return cls(n, gain, codes, layouts, low)

    def frames(self) -> list[TokenFrame]:
        """The frames as `TokenFrame` objects."""
        out = []
        rows = self.codes.tolist()
        lows = self.lowband.tolist()
        for i, (n, g, layout_id) in enumerate(zip(self.num_codebooks.tolist(),
                                                  self.gain_index.tolist(),
                                                  self.lowband_layout.tolist(), strict=True)):
            bins = LAYOUTS[layout_id].bins if layout_id else 0
            out.append(TokenFrame(n, g, tuple(rows[i][:n]), layout_id, tuple(lows[i][:bins])))
        return out


def pack_frame_stream(
    frames: FrameArrays | Sequence[TokenFrame],
    *,
    code_bits: int,
    gain_bits: int,
    version: int = FILE_FORMAT_VERSION,
) -> bytes:
    """Frames as ONE continuous bit stream (no per-frame alignment), zero-padded to a byte:
    the frames of a bitstream file of `version` (3: coded against the previous frame, 2:
    each frame payload as in a packet).

    Cost: one short Python step per frame (about 10-20 µs with a low band).  Raises
    ValueError when a value does not fit its field or the version is unknown.
    """
    return _write_stream(frames, code_bits, gain_bits, version).getvalue()


def frame_stream_bits(
    frames: FrameArrays | Sequence[TokenFrame],
    *,
    code_bits: int,
    gain_bits: int,
    version: int = FILE_FORMAT_VERSION,
) -> int:
    """Bits the frames take in a bitstream file of `version` (before the final padding):
    the file's payload; a packet's payload is `TokenFrame.bit_length` per frame instead."""
    return _write_stream(frames, code_bits, gain_bits, version).bit_length


def _write_stream(
    frames: FrameArrays | Sequence[TokenFrame], code_bits: int, gain_bits: int, version: int
) -> BitWriter:
    _check_params(code_bits, gain_bits)
    _check_version(version)
    if isinstance(frames, FrameArrays):
        frames = frames.frames()
    writer = BitWriter()
    context = _FileContext() if version >= 3 else None
    for frame in frames:
        _write_any(writer, frame, context, code_bits, gain_bits)
    return writer


def _smallest_file_frame_bits(code_bits: int, gain_bits: int, version: int) -> int:
    """Fewest bits a frame can take in a file of `version`: version 3, the mode bit `0`, the
    gain code `00` and one code (`3 + code_bits`); version 2, a one-codebook frame payload
    without low band (`frame_bits(1)`)."""
    if version >= 3:
        return 1 + 2 + code_bits
    return frame_bits(1, code_bits=code_bits, gain_bits=gain_bits)


def _unstreamable(code_bits: int, gain_bits: int, version: int) -> str | None:
    """Why a streamed file (no frame count) cannot have these widths, or None when it can.

    A streamed file is read until fewer than 8 bits are left, the zero padding; that needs
    every frame to take at least 8 bits, else a short frame and padding look alike.
    """
    bits = _smallest_file_frame_bits(code_bits, gain_bits, version)
    if bits >= 8:
        return None
    return (
        f"a streamed file needs frames of at least 8 bits, but with code_bits {code_bits}, "
        f"gain_bits {gain_bits} a version-{version} frame can take {bits}"
    )


def _check_version(version: int) -> None:
    if version not in FILE_FORMAT_VERSIONS:
        raise ValueError(f"file format version must be one of {FILE_FORMAT_VERSIONS}, "
                         f"got {version}")


def unpack_frame_stream(
    data: Buffer,
    *,
    code_bits: int,
    gain_bits: int,
    max_codebooks: int,
    count: int | None = None,
    offset: int = 0,
    version: int = FILE_FORMAT_VERSION,
) -> FrameArrays:
    """Decode a continuous bit stream of frame payloads starting at byte `offset` of `data`.

    `count` frames are expected (then anything beyond the final padding byte is
    `trailing_data`); with `count=None` frames are read until fewer than 8 bits remain,
    which needs widths whose smallest frame takes at least 8 bits (ValueError otherwise).
    The < 8 bits after the last frame are padding and must be zero (`corrupt`).
    Also raises `truncated` and `bad_field` (count 0 or > `max_codebooks`).
    Returns arrays with Q = `max_codebooks` code columns.  `version`: as for
    `pack_frame_stream`.
    """
    _check_version(version)
    problem = _unstreamable(code_bits, gain_bits, version) if count is None else None
    if problem:
        raise ValueError(f"count=None: {problem}")
    frames = _unpack_frames(data, code_bits, gain_bits, max_codebooks, count, offset, version)
    return FrameArrays.from_frames(frames, max_codebooks)


def _unpack_frames(
    data: Buffer, code_bits: int, gain_bits: int, max_codebooks: int, count: int | None,
    offset: int, version: int, max_frames: int | None = None,
) -> list[TokenFrame]:
    """`unpack_frame_stream`'s frames as `TokenFrame`s (no arrays built); `oversized` as
    soon as a frame beyond `max_frames` starts."""
    _check_params(code_bits, gain_bits, max_codebooks)
    view = memoryview(data).cast("B")[offset:]
    reader = BitReader(view)
    frames: list[TokenFrame] = []
    context = _FileContext() if version >= 3 else None
    while (len(frames) < count) if count is not None else (reader.remaining >= 8):
        if max_frames is not None and len(frames) >= max_frames:
            raise ProtocolError(
                ErrorCode.OVERSIZED, f"more than {max_frames} frames (the limit)",
                offset=offset + reader.position // 8,
            )
        try:
            if context is None:
                frame = _read_frame(reader, code_bits, gain_bits, max_codebooks, len(frames))
            else:
                frame = _read_file_frame(reader, context, code_bits, gain_bits, max_codebooks,
                                         len(frames))
            frames.append(frame)
        except ProtocolError as exc:
            if exc.code != ErrorCode.TRUNCATED:
                where = offset + (exc.offset or 0)
                raise ProtocolError(exc.code, exc.message, offset=where) from None
            what = f"of {count}" if count is not None else "(streamed)"
            raise ProtocolError(
                ErrorCode.TRUNCATED,
                f"stream ends inside or before frame {len(frames)} {what}",
                offset=offset + len(view),
            ) from None
    rest = reader.remaining
    if rest >= 8:
        raise ProtocolError(
            ErrorCode.TRAILING_DATA,
            f"{rest // 8} bytes after the last of {len(frames)} frames",
            offset=offset + (reader.position + 7) // 8,
        )
    if rest and reader.peek(rest):
        raise ProtocolError(
            ErrorCode.CORRUPT,
            "non-zero padding bits after the last frame",
            offset=offset + len(view) - 1,
        )
    return frames


# --------------------------------------------------------------------------------------------
# Token packets
# --------------------------------------------------------------------------------------------


def _check_u32(name: str, value: int) -> None:
    if type(value) is not int or not 0 <= value <= _U32_MAX:
        raise ValueError(f"{name} must be an int in 0..2**32-1, got {value!r}")


@dataclass(frozen=True, slots=True)
class PacketTimes:
    """Optional profiling timestamps of a packet, each u32 microseconds modulo 2**32.

    * `client_send_us`: sender clock, when the sending client handed the packet to its socket.
    * `server_recv_us`: server clock, when the server received it.
    * `server_send_us`: server clock, when the server forwarded it (0 until then).

    Clocks differ between machines: only differences on one clock are meaningful (use
    `ts_diff`).  Sender-side values share the clock of `TokenPacket.timestamp_us`.
    """

    client_send_us: int
    server_recv_us: int = 0
    server_send_us: int = 0

    def __post_init__(self) -> None:
        _check_u32("client_send_us", self.client_send_us)
        _check_u32("server_recv_us", self.server_recv_us)
        _check_u32("server_send_us", self.server_send_us)


@dataclass(frozen=True, slots=True)
class TokenPacket:
    """One token packet: exactly one frame of one stream.

    * `stream_id`: u32 identifying the sending stream (chosen by the session layer).
    * `seq`: u16 sequence number, +1 per frame (20 ms), wrapping 65535 → 0.
    * `timestamp_us`: u32, the sender's clock in µs modulo 2**32 at capture of the frame's
      first sample (advances by 20000 per frame when capture is regular).
    * `frame`: the tokens.
    * `times`: optional `PacketTimes` for latency profiling (sets flag bit 0, +12 bytes).

    One frame per packet keeps latency minimal and loss independent per 20 ms; the 14-byte
    header costs 5.6 kbps, irrelevant next to WebSocket/TCP/IP framing.
    """

    stream_id: int
    seq: int
    timestamp_us: int
    frame: TokenFrame
    times: PacketTimes | None = None

    def __post_init__(self) -> None:
        _check_u32("stream_id", self.stream_id)
        if type(self.seq) is not int or not 0 <= self.seq <= 0xFFFF:
            raise ValueError(f"seq must be an int in 0..65535, got {self.seq!r}")
        _check_u32("timestamp_us", self.timestamp_us)

    @property
    def num_codebooks(self) -> int:
        """Codebooks of the carried frame."""
        return self.frame.num_codebooks

    @property
    def gain_index(self) -> int:
        """Gain index of the carried frame."""
        return self.frame.gain_index

    @property
    def codes(self) -> tuple[int, ...]:
        """Codes of the carried frame."""
        return self.frame.codes


def encode_packet(packet: TokenPacket, *, code_bits: int, gain_bits: int) -> bytes:
    """Wire bytes of `packet`: 14-byte header, [12-byte times], byte-padded frame payload.

    Size: 14 (+12) + ceil((11 + 10 n) / 8) bytes for n codebooks at 10/6 bits, e.g. 17 bytes
    for one codebook without times.  Raises ValueError when a value does not fit its field.
    """
    _check_params(code_bits, gain_bits)
    times = packet.times
    header = _PACKET_HEADER.pack(
        PACKET_MAGIC,
        PROTOCOL_VERSION,
        PACKET_TYPE_FRAME,
        FLAG_TIMES if times is not None else 0,
        packet.stream_id,
        packet.seq,
        packet.timestamp_us,
    )
    payload = pack_frame(packet.frame, code_bits=code_bits, gain_bits=gain_bits)
    if times is None:
        return header + payload
    block = _PACKET_TIMES.pack(times.client_send_us, times.server_recv_us, times.server_send_us)
    return header + block + payload


def decode_packet(
    data: Buffer,
    *,
    code_bits: int,
    gain_bits: int,
    max_codebooks: int,
    max_bytes: int | None = None,
) -> TokenPacket:
    """Parse and validate one token packet (one WebSocket binary message).

    `max_codebooks` is the model's Q (or a lower session limit); `max_bytes` defaults to
    `max_packet_size(...)`, the largest valid packet.  Checks, in this order:
    `oversized` (len > max_bytes, before anything is parsed), `bad_magic`, `unknown_version`,
    `truncated` header, `unknown_type`, `bad_field` (reserved flag bits), `truncated` times,
    then the payload: `truncated`, `bad_field` (count 0 or > max_codebooks),
    `trailing_data`, `corrupt` (non-zero padding bits).
    """
    _check_params(code_bits, gain_bits, max_codebooks)
    limit = (
        max_packet_size(code_bits=code_bits, gain_bits=gain_bits, max_codebooks=max_codebooks)
        if max_bytes is None
        else max_bytes
    )
    size = len(data)
    if size > limit:
        raise ProtocolError(
            ErrorCode.OVERSIZED, f"packet of {size} bytes exceeds the limit of {limit} bytes"
        )
    if size == 0:
        raise ProtocolError(ErrorCode.TRUNCATED, "empty packet", offset=0)
    if data[0] != PACKET_MAGIC:
        raise ProtocolError(
            ErrorCode.BAD_MAGIC,
            f"first byte 0x{data[0]:02X} is not the packet magic 0x{PACKET_MAGIC:02X}",
            offset=0,
        )
    if size < 2:
        raise ProtocolError(ErrorCode.TRUNCATED, "packet ends before its version", offset=size)
    if data[1] != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.UNKNOWN_VERSION,
            f"packet version {data[1]} (this reader supports {PROTOCOL_VERSION})",
            offset=1,
        )
    if size < PACKET_HEADER_SIZE:
        raise ProtocolError(
            ErrorCode.TRUNCATED,
            f"packet header needs {PACKET_HEADER_SIZE} bytes, got {size}",
            offset=size,
        )
    _, _, ptype, flags, stream_id, seq, timestamp = _PACKET_HEADER.unpack_from(data, 0)
    if ptype != PACKET_TYPE_FRAME:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"packet type 0x{ptype:02X}", offset=2)
    if flags & ~FLAG_TIMES:
        raise ProtocolError(
            ErrorCode.BAD_FIELD, f"reserved flag bits set in 0x{flags:02X}", offset=3
        )
    offset = PACKET_HEADER_SIZE
    times = None
    if flags & FLAG_TIMES:
        offset += PACKET_TIMES_SIZE
        if size < offset:
            raise ProtocolError(
                ErrorCode.TRUNCATED,
                f"packet with times needs {offset} header bytes, got {size}",
                offset=size,
            )
        times = PacketTimes(*_PACKET_TIMES.unpack_from(data, PACKET_HEADER_SIZE))
    frame = _decode_payload(data, offset, code_bits, gain_bits, max_codebooks)
    return TokenPacket(stream_id, seq, timestamp, frame, times)


# --------------------------------------------------------------------------------------------
# Bitstream files
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """The original audio a bitstream file was encoded from (the *source* extension record).

    `rate`: its sample rate in Hz (1..2**32-1); `samples`: its length in samples at that rate
    (0..2**32-1).  Readers use it to restore the original rate and exact length; the frames
    are read the same way with or without it.
    """

    rate: int
    samples: int

    def __post_init__(self) -> None:
        if not 1 <= self.rate <= _U32_MAX:
            raise ValueError(f"source rate must be in 1..2**32-1 Hz, got {self.rate}")
        if not 0 <= self.samples <= _U32_MAX:
            raise ValueError(f"source samples must be in 0..2**32-1, got {self.samples}")


@dataclass(frozen=True, slots=True)
class BitstreamHeader:
    """Header of a bitstream file.

    * `model_id`: the model card's `model_id`, at most 64 bytes of UTF-8.
    * `sample_rate`: Hz (u32), 16000 for the default model.
    * `frame_size`: samples per frame N (u16), 320 for the default model (20 ms).
    * `code_bits`, `gain_bits`: field widths in bits (1..16), from the model card.
    * `num_codebooks`: the model's Q (1..15); every frame has 1..Q codebooks.
    * `num_frames`: frames in the file, or None for a streamed file written before its
      length was known (stored as 0xFFFFFFFF).
    * `source`: the original audio (`SourceInfo`, the tag-1 extension record), or None for a
      file without the record.
    * `version`: the file format version (`FILE_FORMAT_VERSIONS`): how the frames are coded;
      writers use `FILE_FORMAT_VERSION` unless told otherwise.
    """

    model_id: str
    sample_rate: int
    frame_size: int
    code_bits: int
    gain_bits: int
    num_codebooks: int
    num_frames: int | None = None
    source: SourceInfo | None = None
    version: int = FILE_FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.version not in FILE_FORMAT_VERSIONS:
            raise ValueError(
                f"version must be one of {FILE_FORMAT_VERSIONS}, got {self.version}"
            )
        if len(self.model_id.encode("utf-8")) > MAX_MODEL_ID_BYTES:
            raise ValueError(f"model_id longer than {MAX_MODEL_ID_BYTES} bytes of UTF-8")
        if not 1 <= self.sample_rate <= _U32_MAX:
            raise ValueError(f"sample_rate must be in 1..2**32-1 Hz, got {self.sample_rate}")
        if not 1 <= self.frame_size <= 0xFFFF:
            raise ValueError(f"frame_size must be in 1..65535 samples, got {self.frame_size}")
        _check_params(self.code_bits, self.gain_bits, self.num_codebooks)
        if self.num_frames is not None and not 0 <= self.num_frames < UNKNOWN_FRAME_COUNT:
            raise ValueError(f"num_frames must be in 0..2**32-2 or None, got {self.num_frames}")

    @property
    def frame_rate(self) -> float:
        """Frames per second (50.0 for 16 kHz / 320)."""
        return self.sample_rate / self.frame_size

    @property
    def frame_ms(self) -> float:
        """Duration of one frame in milliseconds (20.0 for 16 kHz / 320)."""
        return 1000.0 * self.frame_size / self.sample_rate


def _encode_extension(header: BitstreamHeader) -> bytes:
    """The extension area of `header`: its records in tag order (empty without any)."""
    if header.source is None:
        return b""
    return _EXT_HEAD.pack(EXT_TAG_SOURCE, _SOURCE.size) + _SOURCE.pack(
        header.source.rate, header.source.samples
    )


def encode_file_header(header: BitstreamHeader) -> bytes:
    """File header bytes: 22 fixed bytes, the model id, the extension records, CRC32.

    26 + len(model_id) bytes, plus 10 with the source record (`header.source`).  A
    streamed header (`num_frames` None) needs widths whose smallest frame takes at least
    8 bits (ValueError otherwise, see docs/protocol.md, "Streamed files").
    """
    problem = (
        _unstreamable(header.code_bits, header.gain_bits, header.version)
        if header.num_frames is None
        else None
    )
    if problem:
        raise ValueError(f"{problem}: give the file its frame count")
    model_id = header.model_id.encode("utf-8")
    extension = _encode_extension(header)
    length = FILE_HEADER_FIXED_SIZE + len(model_id) + len(extension) + _CRC.size
    body = (
        _FILE_FIXED.pack(
            FILE_MAGIC,
            header.version,
            0,
            length,
            header.sample_rate,
            UNKNOWN_FRAME_COUNT if header.num_frames is None else header.num_frames,
            header.frame_size,
            header.code_bits,
            header.gain_bits,
            header.num_codebooks,
            len(model_id),
        )
        + model_id
        + extension
    )
    return body + _CRC.pack(zlib.crc32(body))


def _decode_extension(data: Buffer, start: int, end: int) -> SourceInfo | None:
    """Parse the extension records in `data[start:end]` (a header that passed its CRC).

    Records are tag (u8), length (u8), value; unknown tags are skipped.  A record that does
    not fit the area is `corrupt`; a source record of the wrong length, with rate 0, or
    repeated is `bad_field`.
    """
    source: SourceInfo | None = None
    pos = start
    while pos < end:
        if end - pos < _EXT_HEAD.size:
            raise ProtocolError(
                ErrorCode.CORRUPT,
                f"extension record at byte {pos} has {end - pos} byte(s) before the CRC, "
                f"needs at least {_EXT_HEAD.size} (tag, length)",
                offset=pos,
            )
        tag, size = _EXT_HEAD.unpack_from(data, pos)
        value = pos + _EXT_HEAD.size
        if value + size > end:
            raise ProtocolError(
                ErrorCode.CORRUPT,
                f"extension record (tag {tag}) at byte {pos} has a {size}-byte value, "
                f"{end - value} byte(s) left before the CRC",
                offset=pos + 1,
            )
        if tag == EXT_TAG_SOURCE:
            if source is not None:
                raise ProtocolError(ErrorCode.BAD_FIELD, "second source record (tag 1)", offset=pos)
            if size != _SOURCE.size:
                raise ProtocolError(
                    ErrorCode.BAD_FIELD,
                    f"source record (tag 1) with a {size}-byte value (must be {_SOURCE.size})",
                    offset=pos + 1,
                )
            rate, samples = _SOURCE.unpack_from(data, value)
            if rate == 0:
                raise ProtocolError(
                    ErrorCode.BAD_FIELD, "source record with sample rate 0", offset=value
                )
            source = SourceInfo(rate, samples)
        pos = value + size
    return source


def decode_file_header(data: Buffer) -> tuple[BitstreamHeader, int]:
    """Parse the file header at the start of `data`; returns (header, header length in bytes).

    The frames start at the returned offset.  Checks, in this order: `bad_magic`,
    `unknown_version`, `truncated`, `oversized` (header length > 1024), `corrupt`
    (inconsistent header length, CRC mismatch), `bad_field` (reserved flags, model id
    too long or not UTF-8, out-of-range rates, sizes, bit widths, Q), then the extension
    area between the model id and the CRC: tag-length-value records, unknown tags skipped,
    `corrupt` for a record that overruns the area, `bad_field` for an invalid source record
    (see `_decode_extension`).  The source record becomes `header.source`.  A streamed
    header (frame count 0xFFFFFFFF) whose widths allow a frame of fewer than 8 bits is
    `bad_field` (its end could not be told from padding).
    """
    size = len(data)
    probe = bytes(data[:4])
    if probe != FILE_MAGIC[: len(probe)]:
        raise ProtocolError(ErrorCode.BAD_MAGIC, f"file starts with {probe!r}, not {FILE_MAGIC!r}")
    if size < 5:
        raise ProtocolError(ErrorCode.TRUNCATED, "file ends inside its magic/version", offset=size)
    if data[4] not in FILE_FORMAT_VERSIONS:
        raise ProtocolError(
            ErrorCode.UNKNOWN_VERSION,
            f"file format version {data[4]} (this reader supports "
            f"{' and '.join(map(str, FILE_FORMAT_VERSIONS))})",
            offset=4,
        )
    if size < FILE_HEADER_FIXED_SIZE:
        raise ProtocolError(
            ErrorCode.TRUNCATED,
            f"file header needs at least {FILE_HEADER_FIXED_SIZE} bytes, got {size}",
            offset=size,
        )
    (_, _, flags, length, rate, nframes, fsize, cbits, gbits, q, id_len) = _FILE_FIXED.unpack_from(
        data, 0
    )
    if length > MAX_FILE_HEADER_SIZE:
        raise ProtocolError(
            ErrorCode.OVERSIZED,
            f"header length {length} exceeds {MAX_FILE_HEADER_SIZE} bytes",
            offset=6,
        )
    id_end = FILE_HEADER_FIXED_SIZE + id_len
    if length < id_end + _CRC.size:
        raise ProtocolError(
            ErrorCode.CORRUPT,
            f"header length {length} too small for a {id_len}-byte model id and the CRC",
            offset=6,
        )
    if size < length:
        raise ProtocolError(
            ErrorCode.TRUNCATED, f"file header needs {length} bytes, got {size}", offset=size
        )
    (stored_crc,) = _CRC.unpack_from(data, length - _CRC.size)
    computed = zlib.crc32(data[: length - _CRC.size])
    if stored_crc != computed:
        raise ProtocolError(
            ErrorCode.CORRUPT,
            f"header CRC32 0x{stored_crc:08X} != computed 0x{computed:08X}",
            offset=length - _CRC.size,
        )
    if flags:
        raise ProtocolError(ErrorCode.BAD_FIELD, f"reserved header flags 0x{flags:02X}", offset=5)
    if id_len > MAX_MODEL_ID_BYTES:
        raise ProtocolError(
            ErrorCode.BAD_FIELD, f"model id of {id_len} bytes (max {MAX_MODEL_ID_BYTES})", offset=21
        )
    try:
        model_id = bytes(data[FILE_HEADER_FIXED_SIZE:id_end]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(
            ErrorCode.BAD_FIELD, f"model id is not UTF-8 ({exc.reason})", offset=22
        ) from None
    checks = (
        ("sample_rate", rate, 1, _U32_MAX, 8),
        ("frame_size", fsize, 1, 0xFFFF, 16),
        ("code_bits", cbits, 1, MAX_FIELD_BITS, 18),
        ("gain_bits", gbits, 1, MAX_FIELD_BITS, 19),
        ("num_codebooks", q, 1, MAX_CODEBOOKS, 20),
    )
    for name, value, lo, hi, where in checks:
        if not lo <= value <= hi:
            raise ProtocolError(
                ErrorCode.BAD_FIELD, f"{name} {value} outside {lo}..{hi}", offset=where
            )
    problem = _unstreamable(cbits, gbits, data[4]) if nframes == UNKNOWN_FRAME_COUNT else None
    if problem:
        raise ProtocolError(ErrorCode.BAD_FIELD, problem, offset=12)
    header = BitstreamHeader(
        model_id,
        rate,
        fsize,
        cbits,
        gbits,
        q,
        None if nframes == UNKNOWN_FRAME_COUNT else nframes,
        _decode_extension(data, id_end, length - _CRC.size),
        data[4],
    )
    return header, length


class BitstreamWriter:
    """Incremental writer of a bitstream file.

    `header.num_frames` is ignored: the writer counts frames; the other fields, `source`
    included, go into the file header as they are.  Two ways to get bytes:

    * `getvalue()` / `finalize()`: the complete file of the frames added so far, with the
      exact frame count in its header (finalize also closes the writer).
    * `drain()`: for live recording, the bytes of a *streamed* file (frame count 0xFFFFFFFF)
      not returned by earlier drains: the header on the first call, then whole payload bytes;
      `drain(final=True)` adds the zero-padded last byte and closes the writer.  The
      concatenation of all drained chunks is a valid file.

    Each `add` costs O(bits of the frame), whatever the length of the stream.
    """

    __slots__ = ("_bits", "_closed", "_context", "_count", "_drained", "_header", "_q")

    def __init__(self, header: BitstreamHeader) -> None:
        self._header = header
        self._q = header.num_codebooks
        self._context = _FileContext() if header.version >= 3 else None
        self._bits = BitWriter()
        self._count = 0
        self._drained = -1  # payload bytes returned by drain(); -1: header not yet returned
        self._closed = False

    @property
    def num_frames(self) -> int:
        """Frames added so far."""
        return self._count

    @property
    def payload_bits(self) -> int:
        """Bits of frame payloads so far (excluding header and final padding)."""
        return self._bits.bit_length

    @property
    def closed(self) -> bool:
        """True after `finalize()` or `drain(final=True)`."""
        return self._closed

    def add(self, frame: TokenFrame) -> None:
        """Append one frame (1..Q codebooks; values must fit their bit widths)."""
        if self._closed:
            raise ValueError("BitstreamWriter is closed")
        if frame.num_codebooks > self._q:
            raise ValueError(f"frame has {frame.num_codebooks} codebooks, file Q is {self._q}")
        if self._count >= UNKNOWN_FRAME_COUNT - 1:
            raise ValueError("a bitstream file holds at most 2**32-2 frames")
        header = self._header
        _write_any(self._bits, frame, self._context, header.code_bits, header.gain_bits)
        self._count += 1

    def add_frames(self, frames: Iterable[TokenFrame]) -> None:
        """Append frames in order."""
        for frame in frames:
            self.add(frame)

    def _header_bytes(self, num_frames: int | None) -> bytes:
        return encode_file_header(replace(self._header, num_frames=num_frames))

    def getvalue(self) -> bytes:
        """The complete file of all frames so far (exact count in the header)."""
        return self._header_bytes(self._count) + self._bits.getvalue()

    def finalize(self) -> bytes:
        """`getvalue()`, then close the writer."""
        self._closed = True
        return self.getvalue()

    def drain(self, *, final: bool = False) -> bytes:
        """Streamed-file bytes not returned before (see the class docstring).  ValueError
        when the header's widths allow a frame of fewer than 8 bits (`encode_file_header`):
        a streamed file of them could not be read back."""
        if self._closed and not final:
            raise ValueError("BitstreamWriter is closed")
        head = b""
        if self._drained < 0:
            head = self._header_bytes(None)
            self._drained = 0
        if final:
            self._closed = True
            body = self._bits.getvalue()[self._drained :]
        else:
            body = self._bits.complete_bytes(self._drained)
        self._drained += len(body)
        return head + body


def write_bitstream(header: BitstreamHeader, frames: Iterable[TokenFrame]) -> bytes:
    """The complete bitstream file of `frames` (`BitstreamWriter(header)`, then `finalize`)."""
    writer = BitstreamWriter(header)
    writer.add_frames(frames)
    return writer.finalize()


def read_bitstream_arrays(
    data: Buffer, *, max_bytes: int | None = None, max_frames: int | None = None
) -> tuple[BitstreamHeader, FrameArrays]:
    """Parse a whole bitstream file into its header and `FrameArrays` (codes [F, Q]).

    Raises ProtocolError for any malformed input: `oversized` (len > `max_bytes`, or more
    than `max_frames` frames: said by the header, or met while reading a streamed file, so
    a small file of tiny frames cannot make the reader build millions of them), header
    errors (see `decode_file_header`), `truncated` (fewer frames than the header says, or a
    streamed file cut inside a frame), `bad_field` (a frame count 0 or > Q), `trailing_data`,
    `corrupt` (non-zero final padding).  The payload has no checksum of its own.
    """
    header, frames = read_bitstream(data, max_bytes=max_bytes, max_frames=max_frames)
    return header, FrameArrays.from_frames(frames, header.num_codebooks)


def read_bitstream(
    data: Buffer, *, max_bytes: int | None = None, max_frames: int | None = None
) -> tuple[BitstreamHeader, list[TokenFrame]]:
    """Parse a whole bitstream file into its header and frames (errors: see
    `read_bitstream_arrays`)."""
    if max_bytes is not None and len(data) > max_bytes:
        raise ProtocolError(
            ErrorCode.OVERSIZED, f"file of {len(data)} bytes exceeds the limit of {max_bytes}"
        )
    header, offset = decode_file_header(data)
    if max_frames is not None and (header.num_frames or 0) > max_frames:
        raise ProtocolError(
            ErrorCode.OVERSIZED,
            f"the header says {header.num_frames} frames; the limit is {max_frames}",
        )
    frames = _unpack_frames(
        data, header.code_bits, header.gain_bits, header.num_codebooks, header.num_frames, offset,
        header.version, max_frames,
    )
    return header, frames


# --------------------------------------------------------------------------------------------
# JSON form
# --------------------------------------------------------------------------------------------

_FRAME_KEYS: Final = frozenset({"num_codebooks", "gain_index", "codes"})
_FRAME_OPTIONAL: Final = frozenset({"lowband"})
_LOWBAND_KEYS: Final = frozenset({"layout", "indices"})
_PACKET_KEYS: Final = _FRAME_KEYS | {"version", "stream_id", "seq", "timestamp_us"}
_PACKET_OPTIONAL: Final = frozenset({"times"}) | _FRAME_OPTIONAL
_TIMES_KEYS: Final = ("client_send_us", "server_recv_us", "server_send_us")


def frame_to_json(frame: TokenFrame) -> dict[str, object]:
    """JSON-ready dict of a frame: {"num_codebooks", "gain_index", "codes": [...]}, plus
    "lowband": {"layout": id, "indices": [...]} when the frame has a low band."""
    out: dict[str, object] = {
        "num_codebooks": frame.num_codebooks,
        "gain_index": frame.gain_index,
        "codes": list(frame.codes),
    }
    if frame.lowband_layout != LOWBAND_LAYOUT_NONE:
        out["lowband"] = {"layout": frame.lowband_layout, "indices": list(frame.lowband)}
    return out


def packet_to_json(packet: TokenPacket) -> dict[str, object]:
    """JSON-ready dict of a packet (see docs/protocol.md, "JSON form")."""
    out: dict[str, object] = {
        "version": PROTOCOL_VERSION,
        "stream_id": packet.stream_id,
        "seq": packet.seq,
        "timestamp_us": packet.timestamp_us,
        **frame_to_json(packet.frame),
    }
    if packet.times is not None:
        t = packet.times
        out["times"] = {
            "client_send_us": t.client_send_us,
            "server_recv_us": t.server_recv_us,
            "server_send_us": t.server_send_us,
        }
    return out


def reject_json_constant(name: str) -> object:
    """`json.loads(parse_constant=)` hook: NaN, Infinity and -Infinity are not JSON (and
    no reply could echo them: `json.dumps(allow_nan=False)` refuses them)."""
    raise ValueError(f"{name} is not a JSON value")


def _json_object(obj: object, what: str, *, text: bool = True) -> Mapping[str, object]:
    """`obj` as a JSON object; with `text`, JSON text is parsed first (`corrupt` when it
    does not parse: NaN/Infinity and nesting too deep to parse included)."""
    if text and isinstance(obj, (str, bytes, bytearray)):
        try:
            obj = json.loads(obj, parse_constant=reject_json_constant)
        except ValueError as exc:  # UnicodeDecodeError included
            raise ProtocolError(ErrorCode.CORRUPT, f"{what} is not valid JSON: {exc}") from None
        except RecursionError:
            raise ProtocolError(
                ErrorCode.CORRUPT, f"{what} is not valid JSON: nested too deeply"
            ) from None
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise ProtocolError(ErrorCode.BAD_FIELD, f"{what} must be a JSON object")
    return obj


def _check_keys(
    obj: Mapping[str, object], required: frozenset[str], optional: frozenset[str], what: str
) -> None:
    missing = required - obj.keys()
    if missing:
        raise ProtocolError(ErrorCode.BAD_FIELD, f"{what} lacks {sorted(missing)}")
    unknown = obj.keys() - required - optional
    if unknown:
        raise ProtocolError(ErrorCode.BAD_FIELD, f"{what} has unknown keys {sorted(unknown)}")


def _json_int(value: object, name: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise ProtocolError(ErrorCode.BAD_FIELD, f"{name} must be an int in {lo}..{hi}")
    return value


def _frame_from_mapping(
    obj: Mapping[str, object], code_bits: int, gain_bits: int, max_codebooks: int
) -> TokenFrame:
    n = _json_int(obj["num_codebooks"], "num_codebooks", 1, max_codebooks)
    gain = _json_int(obj["gain_index"], "gain_index", 0, (1 << gain_bits) - 1)
    raw = obj["codes"]
    if not isinstance(raw, list) or len(raw) != n:
        raise ProtocolError(ErrorCode.BAD_FIELD, f"codes must be a list of {n} ints")
    top = (1 << code_bits) - 1
    codes = tuple(_json_int(c, f"codes[{i}]", 0, top) for i, c in enumerate(raw))
    if "lowband" not in obj:
        return TokenFrame(n, gain, codes)
    low = _json_object(obj["lowband"], "lowband", text=False)
    _check_keys(low, _LOWBAND_KEYS, frozenset(), "lowband")
    layout_id = _json_int(low["layout"], "lowband.layout", 1, max(LAYOUTS))
    spec = LAYOUTS[layout_id]
    raw = low["indices"]
    if not isinstance(raw, list) or len(raw) != spec.bins:
        raise ProtocolError(
            ErrorCode.BAD_FIELD, f"lowband.indices must be a list of {spec.bins} ints"
        )
    m = spec.max_index
    indices = tuple(_json_int(v, f"lowband.indices[{i}]", -m, m) for i, v in enumerate(raw))
    return TokenFrame(n, gain, codes, layout_id, indices)


def frame_from_json(
    obj: Mapping[str, object] | str | bytes,
    *,
    code_bits: int,
    gain_bits: int,
    max_codebooks: int,
) -> TokenFrame:
    """Validate and convert the JSON form of a frame (a dict, or JSON text).

    Raises ProtocolError: `corrupt` (unparsable text), `bad_field` (not an object, missing or
    unknown keys, non-int or out-of-range values, `len(codes) != num_codebooks`).
    """
    _check_params(code_bits, gain_bits, max_codebooks)
    mapping = _json_object(obj, "frame")
    _check_keys(mapping, _FRAME_KEYS, _FRAME_OPTIONAL, "frame")
    return _frame_from_mapping(mapping, code_bits, gain_bits, max_codebooks)


def _json_version(value: object) -> None:
    """Check a JSON packet's "version": an int (`bad_field` otherwise: 2.0 and true are
    not), equal to `PROTOCOL_VERSION` (`unknown_version` otherwise)."""
    if type(value) is not int:
        raise ProtocolError(
            ErrorCode.BAD_FIELD, f"version must be an int, got {type(value).__name__}"
        )
    if value != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.UNKNOWN_VERSION,
            f"packet version {value} (this reader supports {PROTOCOL_VERSION})",
        )


def packet_from_json(
    obj: Mapping[str, object] | str | bytes,
    *,
    code_bits: int,
    gain_bits: int,
    max_codebooks: int,
) -> TokenPacket:
    """Validate and convert the JSON form of a packet (a dict, or JSON text).

    Raises ProtocolError as `frame_from_json`, plus `unknown_version` for an int "version"
    other than `PROTOCOL_VERSION` (a "version" that is not an int is `bad_field`).
    """
    _check_params(code_bits, gain_bits, max_codebooks)
    mapping = _json_object(obj, "packet")
    if "version" in mapping:
        _json_version(mapping["version"])
    _check_keys(mapping, _PACKET_KEYS, _PACKET_OPTIONAL, "packet")
    times = None
    if "times" in mapping:
        raw_times = _json_object(mapping["times"], "times", text=False)
        _check_keys(raw_times, frozenset(_TIMES_KEYS), frozenset(), "times")
        c, r, s = (_json_int(raw_times[k], k, 0, _U32_MAX) for k in _TIMES_KEYS)
        times = PacketTimes(c, r, s)
    return TokenPacket(
        _json_int(mapping["stream_id"], "stream_id", 0, _U32_MAX),
        _json_int(mapping["seq"], "seq", 0, 0xFFFF),
        _json_int(mapping["timestamp_us"], "timestamp_us", 0, _U32_MAX),
        _frame_from_mapping(mapping, code_bits, gain_bits, max_codebooks),
        times,
    )
