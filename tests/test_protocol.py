"""Wire and file formats (streaming/protocol.py, streaming/lowband.py, docs/protocol.md).

The fixed byte vectors below are the format: if one of them changes, the format changed and
PROTOCOL_VERSION / FILE_FORMAT_VERSION must be bumped (and docs/protocol.md updated).  Each
vector is derived by hand from the bit layout of docs/protocol.md (the derivation is the
comment next to it); only the CRC32 fields are computed, with zlib, the reference CRC-32.

Version 2 frame payload: num_codebooks (4) | gain_index (gain_bits) | low-band layout as a
prefix code (`0` none, `10` layout 1, `11` layout 2) | codes (n x code_bits) | for layouts
1 and 2 the low-band indices, Huffman-coded in pairs of adjacent bins.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import pickle
import random
import struct
import zlib
from collections import deque
from dataclasses import replace
from functools import cache

import numpy as np
import pytest

from streaming.lowband import FLOOR, LAYOUTS
from streaming.lowband_tables import MARGINALS
from streaming.protocol import (
    EXT_TAG_SOURCE,
    FILE_FORMAT_VERSION,
    FILE_FORMAT_VERSIONS,
    LOWBAND_LAYOUT_NONE,
    MAX_LOWBAND_BINS,
    PROTOCOL_VERSION,
    UNKNOWN_FRAME_COUNT,
    BitReader,
    BitstreamHeader,
    BitstreamWriter,
    BitWriter,
    ErrorCode,
    FrameArrays,
    PacketTimes,
    ProtocolError,
    SourceInfo,
    TokenFrame,
    TokenPacket,
    decode_file_header,
    decode_packet,
    encode_file_header,
    encode_packet,
    frame_bits,
    frame_from_json,
    frame_to_json,
    max_packet_size,
    pack_frame,
    pack_frame_stream,
    packet_from_json,
    packet_to_json,
    payload_size,
    read_bitstream,
    read_bitstream_arrays,
    seq_add,
    seq_diff,
    seq_le,
    seq_lt,
    ts_diff,
    unpack_frame,
    unpack_frame_stream,
    write_bitstream,
)

CODE_BITS, GAIN_BITS, Q = 10, 6, 12
BITS = {"code_bits": CODE_BITS, "gain_bits": GAIN_BITS}
LIMITS = {**BITS, "max_codebooks": Q}
# the layouts' sizes (pinned in test_lowband_layouts_are_pinned): bins and largest |index|
BINS1, M1 = LAYOUTS[1].bins, LAYOUTS[1].max_index
BINS2, M2 = LAYOUTS[2].bins, LAYOUTS[2].max_index

# --------------------------------------------------------------------------- fixed vectors

PACKET_A = TokenPacket(stream_id=7, seq=65535, timestamp_us=20000, frame=TokenFrame(1, 33, (1023,)))
PACKET_A_BYTES = bytes.fromhex(
    "c5 02 01 00"  # magic, version 2, type 1 (frame), flags 0
    "00 00 00 07"  # stream id 7
    "ff ff"  # seq 65535
    "00 00 4e 20"  # timestamp 20000 µs
    "18 5f f8"  # 0001 100001 0 1111111111 000: n=1, gain=33, no low band, code 1023, 3 pad bits
)

PACKET_B = TokenPacket(
    stream_id=0x01020304,
    seq=1,
    timestamp_us=0xFFFFFFF0,
    frame=TokenFrame(3, 63, (1, 2, 1000)),
    times=PacketTimes(0x11223344, 0x55667788, 0x99AABBCC),
)
PACKET_B_BYTES = bytes.fromhex(
    "c5 02 01 01"  # flags: bit 0 = times block present
    "01 02 03 04"
    "00 01"
    "ff ff ff f0"
    "11 22 33 44 55 66 77 88 99 aa bb cc"  # client send, server recv, server send (µs)
    # 0011 111111 0 0000000001 0000000010 1111101000 + 7 pad bits (41 bits):
    # 00111111 11000000 00001000 00000101 11110100 0|0000000
    "3f c0 08 05 f4 00"
)

# a frame with a layout-1 low band (32 bins, M = 6); pairs (bin 2p, bin 2p+1)
LOWBAND_L = (6, -6, 1, 0, 0, -1, 0, 0, 2, 0) + (0,) * 20 + (-3, 1)
PACKET_L = TokenPacket(
    stream_id=9, seq=2, timestamp_us=40000, frame=TokenFrame(2, 17, (5, 1000), 1, LOWBAND_L)
)
PACKET_L_BYTES = bytes.fromhex(
    "c5 02 01 00 00 00 00 09 00 02 00 00 9c 40"  # stream 9, seq 2, timestamp 40000 µs
    # 0010 010001 10 0000000101 1111101000 (32 bits): n=2, gain 17, layout 1, codes 5, 1000
    "24 60 17 e8"
    # the 16 pairs, each with the canonical code of its pair position (layout 1, M = 6,
    # `LAYOUTS[1].pair_code(p)`, symbol (a + 6) * 13 + (b + 6)):
    #  p0 (6, -6) 11111111111111110110 | p1 (1, 0) 1100 | p2 (0, -1) 1001 | p3 (0, 0) 00 |
    #  p4 (2, 0) 11001 | p5..p14 (0, 0) 0 each | p15 (-3, 1) 1111111101111
    # = 58 bits, + 6 pad bits (90 bits in all):
    # 11111111 11111111 01101100 10010011 00100000 00000111 11111011 11|000000
    "ff ff 6c 93 20 07 fb c0"
)

# the packet A of version 1 (no low-band field: 0001 100001 1111111111 0000)
PACKET_A_V1_BYTES = bytes.fromhex("c5 01 01 00 00 00 00 07 ff ff 00 00 4e 20 18 7f f0")

FILE_HEADER = BitstreamHeader("cs-test", 16000, 320, CODE_BITS, GAIN_BITS, Q, num_frames=2,
                              version=2)
FILE_FRAMES = [TokenFrame(1, 33, (1023,)), TokenFrame(2, 0, (0, 5))]
FILE_BYTES = bytes.fromhex(
    "43 53 54 52"  # "CSTR"
    "02 00"  # format version 2, flags 0
    "00 21"  # header length 33
    "00 00 3e 80"  # sample rate 16000
    "00 00 00 02"  # 2 frames
    "01 40"  # frame size 320
    "0a 06 0c"  # code bits 10, gain bits 6, Q 12
    "07 63 73 2d 74 65 73 74"  # model id "cs-test"
    "b2 1f 6b e8"  # CRC32 of bytes 0..28
    # 0001 100001 0 1111111111 | 0010 000000 0 0000000000 0000000101 | 0000:
    # 21 + 31 bits of frames, 4 zero bits of padding =
    # 00011000 01011111 11111001 00000000 00000000 00000000 0101|0000
    "18 5f f9 00 00 00 50"
)
STREAMED_FILE_BYTES = bytes.fromhex(
    "43 53 54 52 02 00 00 21 00 00 3e 80"
    "ff ff ff ff"  # frame count unknown
    "01 40 0a 06 0c 07 63 73 2d 74 65 73 74"
    "65 61 a1 07"
    "18 5f f9 00 00 00 50"
)

# the same file with the source extension record (tag 1): the original audio was 2.5 s at
# 44.1 kHz; what `codec-client encode` writes
SOURCE = SourceInfo(rate=44100, samples=110250)
SOURCE_FILE_HEADER = BitstreamHeader(
    "cs-test", 16000, 320, CODE_BITS, GAIN_BITS, Q, num_frames=2, source=SOURCE, version=2
)
SOURCE_FILE_BYTES = bytes.fromhex(
    "43 53 54 52 02 00"
    "00 2b"  # header length 43 = 33 + a 10-byte extension area
    "00 00 3e 80 00 00 00 02 01 40 0a 06 0c 07 63 73 2d 74 65 73 74"
    "01 08"  # extension record: tag 1 (source), value of 8 bytes
    "00 00 ac 44"  # source sample rate 44100
    "00 01 ae aa"  # source samples 110250
    "40 db 29 59"  # CRC32 of bytes 0..38
    "18 5f f9 00 00 00 50"
)
STREAMED_SOURCE_FILE_BYTES = bytes.fromhex(
    "43 53 54 52 02 00 00 2b 00 00 3e 80"
    "ff ff ff ff"
    "01 40 0a 06 0c 07 63 73 2d 74 65 73 74"
    "01 08 00 00 ac 44 00 01 ae aa"
    "7c 65 48 1a"
    "18 5f f9 00 00 00 50"
)

# the file of version 1 (the version-1 FILE_BYTES, frames without the low-band field)
FILE_V1_BYTES = bytes.fromhex(
    "43 53 54 52 01 00 00 21 00 00 3e 80 00 00 00 02 01 40 0a 06 0c 07 63 73 2d 74 65 73 74"
    "87 f2 dd bb 18 7f f2 00 00 01 40"
)

# version 3 (what writers produce): each frame's count/layout and gain coded against the
# previous frame's (before the first: 1 codebook, no low band, gain 0)
FILE_V3_HEADER = BitstreamHeader("cs-test", 16000, 320, CODE_BITS, GAIN_BITS, Q, num_frames=4)
FILE_V3_FRAMES = [*FILE_FRAMES, TokenFrame(2, 1, (7, 8)), TokenFrame(2, 4, (9, 10))]
FILE_V3_BYTES = bytes.fromhex(
    "43 53 54 52"  # "CSTR"
    "03 00"  # format version 3, flags 0
    "00 21 00 00 3e 80"  # header length 33, sample rate 16000
    "00 00 00 04"  # 4 frames
    "01 40 0a 06 0c 07 63 73 2d 74 65 73 74"  # as in version 2
    "ef 56 b0 50"  # CRC32 of bytes 0..28
    # frame 0: 0 (1 codebook, no low band: as before the first frame) | 111 100001 (gain 33
    #   sent whole: 33 - 0 is more than 7) | 1111111111
    # frame 1: 1 0010 0 (2 codebooks, no low band) | 111 000000 (gain 0) | 0000000000
    #   0000000101
    # frame 2: 0 (same mode) | 01 0 (gain +1) | 0000000111 0000001000
    # frame 3: 0 | 10 0 1 (gain +3) | 0000001001 0000001010
    # = 20 + 35 + 24 + 25 = 104 bits, no padding
    "78 7f f9 38 00 00 0a 40 38 10 90 24 0a"
)


# the low-band coding tables: sha256 of the code lengths of every pair position of every
# layout (layouts by id, pairs in order, one byte per symbol); any change of
# streaming/lowband_tables.py or of the code construction changes it
LOWBAND_CODE_DIGEST = "57124693e380563e2da09a7a7588ab736920118e0210b24e1237faffc9aef77e"


def _decode(data: bytes | bytearray | memoryview, **overrides: int) -> TokenPacket:
    return decode_packet(data, **{**LIMITS, **overrides})


def _expect(code: ErrorCode, func: object, *args: object, **kwargs: object) -> ProtocolError:
    assert callable(func)
    with pytest.raises(ProtocolError) as info:
        func(*args, **kwargs)
    assert info.value.code == code, str(info.value)
    return info.value


def _with_crc(body: bytes) -> bytes:
    """A file header body (everything before the CRC) plus its correct CRC32."""
    return body + struct.pack(">I", zlib.crc32(body))


def _header_body(
    *,
    version: int = 2,
    flags: int = 0,
    rate: int = 16000,
    frames: int = 2,
    fsize: int = 320,
    cbits: int = 10,
    gbits: int = 6,
    q: int = 12,
    model_id: bytes = b"cs-test",
    id_len: int | None = None,
    length: int | None = None,
) -> bytes:
    id_len = len(model_id) if id_len is None else id_len
    length = 26 + len(model_id) if length is None else length
    fields = (version, flags, length, rate, frames, fsize, cbits, gbits, q, id_len)
    return struct.pack(">4sBBHIIHBBBB", b"CSTR", *fields) + model_id


# --------------------------------------------------------------------------- reference coder


def _ref_huffman_lengths(freq: list[int]) -> list[int]:
    """Independent reference of the documented Huffman construction (two-queue method).

    Nodes are ranked by (frequency, creation number): leaves are created first, in symbol
    order, internal nodes in the order they are made; the two lowest-ranked nodes are merged
    first.  Leaves wait sorted by rank, internal nodes in a FIFO (they are made in
    non-decreasing frequency), so the lowest node is always at the front of one of the two.
    """
    leaves = deque(sorted((f, s) for s, f in enumerate(freq)))
    internal: deque[tuple[int, int]] = deque()
    parent: dict[int, int] = {}
    made = len(freq)

    def lowest() -> tuple[int, int]:
        if internal and (not leaves or internal[0] < leaves[0]):
            return internal.popleft()
        return leaves.popleft()

    while len(leaves) + len(internal) > 1:
        (f1, a), (f2, b) = lowest(), lowest()
        parent[a] = parent[b] = made
        internal.append((f1 + f2, made))
        made += 1
    root = made - 1
    lengths = []
    for symbol in range(len(freq)):
        depth, node = 0, symbol
        while node != root:
            node, depth = parent[node], depth + 1
        lengths.append(depth)
    return lengths


@cache
def _ref_pair_code(layout_id: int, pair: int) -> tuple[str, ...]:
    """The canonical code of every symbol (a + M)(2M + 1) + (b + M) of one pair position, as
    '0'/'1' strings, built from the integer tables alone (docs/protocol.md, "Low band")."""
    _, _, _, marginals = MARGINALS[layout_id]
    m = len(marginals[0]) - 1
    c1, c2 = marginals[2 * pair], marginals[2 * pair + 1]
    freq = [c1[abs(a)] * c2[abs(b)] + 4096 for a in range(-m, m + 1) for b in range(-m, m + 1)]
    lengths = _ref_huffman_lengths(freq)
    codes = [""] * len(lengths)
    value = previous = 0
    for symbol in sorted(range(len(lengths)), key=lambda s: (lengths[s], s)):
        value <<= lengths[symbol] - previous
        previous = lengths[symbol]
        codes[symbol] = format(value, f"0{previous}b")
        value += 1
    return tuple(codes)


def _ref_lowband_bits(layout_id: int, indices: tuple[int, ...]) -> str:
    """The low-band bits of `indices`: the reference code of each pair, in bin order."""
    m = len(MARGINALS[layout_id][3][0]) - 1
    return "".join(
        _ref_pair_code(layout_id, p)[(indices[2 * p] + m) * (2 * m + 1) + indices[2 * p + 1] + m]
        for p in range(len(indices) // 2)
    )


_REF_LAYOUT_FIELD = {0: "0", 1: "10", 2: "11"}


def _ref_bits(frame: TokenFrame, code_bits: int = CODE_BITS, gain_bits: int = GAIN_BITS) -> str:
    """Independent reference: the frame payload as a '0'/'1' string."""
    out = format(frame.num_codebooks, "04b") + format(frame.gain_index, f"0{gain_bits}b")
    out += _REF_LAYOUT_FIELD[frame.lowband_layout]
    out += "".join(format(c, f"0{code_bits}b") for c in frame.codes)
    if frame.lowband_layout:
        out += _ref_lowband_bits(frame.lowband_layout, frame.lowband)
    return out


def _ref_gain_bits(gain: int, previous: int, gain_bits: int = GAIN_BITS) -> str:
    """Independent reference of the version-3 file's gain code."""
    delta = gain - previous
    sign = "1" if delta < 0 else "0"
    size = abs(delta)
    if size == 0:
        return "00"
    if size == 1:
        return "01" + sign
    if size <= 3:
        return "10" + sign + format(size - 2, "01b")
    if size <= 7:
        return "110" + sign + format(size - 4, "02b")
    return "111" + format(gain, f"0{gain_bits}b")


def _ref_file_bits(
    frames: list[TokenFrame], code_bits: int = CODE_BITS, gain_bits: int = GAIN_BITS
) -> str:
    """Independent reference: the frames of a version-3 file as a '0'/'1' string (each
    frame's count and layout, and gain, coded against the previous frame's; before the
    first: 1 codebook, no low band, gain 0)."""
    out, previous = "", (1, 0, 0)
    for f in frames:
        if (f.num_codebooks, f.lowband_layout) == previous[:2]:
            out += "0"
        else:
            out += "1" + format(f.num_codebooks, "04b") + _REF_LAYOUT_FIELD[f.lowband_layout]
        out += _ref_gain_bits(f.gain_index, previous[2], gain_bits)
        out += "".join(format(c, f"0{code_bits}b") for c in f.codes)
        if f.lowband_layout:
            out += _ref_lowband_bits(f.lowband_layout, f.lowband)
        previous = (f.num_codebooks, f.lowband_layout, f.gain_index)
    return out


def _ref_stream_bits(frames: list[TokenFrame], version: int) -> str:
    """The frames of a file of `version` as a '0'/'1' string."""
    return _ref_file_bits(frames) if version == 3 else "".join(_ref_bits(f) for f in frames)


def _bits_to_bytes(bits: str) -> bytes:
    bits += "0" * (-len(bits) % 8)
    return bytes(int(bits[i : i + 8], 2) for i in range(0, len(bits), 8))


def _bytes_to_bits(data: bytes) -> str:
    return "".join(format(byte, "08b") for byte in data)


def _random_lowband(rng: random.Random, layout_id: int) -> tuple[int, ...]:
    """Indices of a layout, mostly small, with the extremes ±M frequent."""
    spec = LAYOUTS[layout_id]
    m = spec.max_index
    return tuple(rng.choice((0, 0, 0, 1, -1, m, -m, rng.randint(-m, m))) for _ in range(spec.bins))


def _random_frame(
    rng: random.Random,
    q: int = Q,
    code_bits: int = CODE_BITS,
    gain_bits: int = GAIN_BITS,
    lowband: bool = True,
) -> TokenFrame:
    """A random frame; with `lowband`, a third each without low band, layout 1, layout 2."""
    n = rng.randint(1, q)
    codes = tuple(rng.randrange(1 << code_bits) for _ in range(n))
    layout_id = rng.choice((0, 1, 2)) if lowband else 0
    low = _random_lowband(rng, layout_id) if layout_id else ()
    return TokenFrame(n, rng.randrange(1 << gain_bits), codes, layout_id, low)


def _stream_like(frames: list[TokenFrame], rng: random.Random) -> list[TokenFrame]:
    """`frames` reshaped like an encoder's output: mostly the previous frame's codebook count
    and layout, gain steps of -9..9 (every branch of the file's gain code) and jumps."""
    out: list[TokenFrame] = []
    for f in frames:
        if out and rng.random() < 0.7:
            prev = out[-1]
            n, layout_id = prev.num_codebooks, prev.lowband_layout
            low = _random_lowband(rng, layout_id) if layout_id else ()
            codes = tuple(rng.randrange(1 << CODE_BITS) for _ in range(n))
            gain = min(max(prev.gain_index + rng.randint(-9, 9), 0), (1 << GAIN_BITS) - 1)
            f = TokenFrame(n, gain, codes, layout_id, low)
        out.append(f)
    return out


def _random_packet(rng: random.Random) -> TokenPacket:
    times = None
    if rng.random() < 0.5:
        times = PacketTimes(*(rng.randrange(1 << 32) for _ in range(3)))
    return TokenPacket(
        rng.randrange(1 << 32), rng.randrange(1 << 16), rng.randrange(1 << 32),
        _random_frame(rng), times,
    )  # fmt: skip


# --------------------------------------------------------------------------- fixed vectors


def test_versions() -> None:
    assert PROTOCOL_VERSION == 2
    assert FILE_FORMAT_VERSION == 3
    assert FILE_FORMAT_VERSIONS == (2, 3)


def test_packet_vectors_encode_exactly() -> None:
    assert encode_packet(PACKET_A, **BITS) == PACKET_A_BYTES
    assert encode_packet(PACKET_B, **BITS) == PACKET_B_BYTES
    assert len(PACKET_A_BYTES) == 17
    assert len(PACKET_B_BYTES) == 32
    # the hand derivations match the reference packer too
    assert PACKET_A_BYTES[14:] == _bits_to_bytes(_ref_bits(PACKET_A.frame))
    assert PACKET_B_BYTES[26:] == _bits_to_bytes(_ref_bits(PACKET_B.frame))


def test_packet_vectors_decode_exactly() -> None:
    assert _decode(PACKET_A_BYTES) == PACKET_A
    assert _decode(PACKET_B_BYTES) == PACKET_B
    decoded = _decode(PACKET_B_BYTES)
    assert (decoded.num_codebooks, decoded.gain_index, decoded.codes) == (3, 63, (1, 2, 1000))
    assert (decoded.frame.lowband_layout, decoded.frame.lowband) == (0, ())
    # any bytes-like input
    assert _decode(bytearray(PACKET_B_BYTES)) == PACKET_B
    assert _decode(memoryview(PACKET_B_BYTES)) == PACKET_B


def test_lowband_packet_vector() -> None:
    frame = PACKET_L.frame
    # the expected bits, from the canonical code of each pair position (not from the packer)
    head = "0010" + "010001" + "10" + "0000000101" + "1111101000"
    low = "".join(
        format(code.codes[s], f"0{code.lengths[s]}b")
        for code, s in (
            (LAYOUTS[1].pair_code(p), (LOWBAND_L[2 * p] + 6) * 13 + LOWBAND_L[2 * p + 1] + 6)
            for p in range(16)
        )
    )
    assert low == _ref_lowband_bits(1, LOWBAND_L)  # the reference builder agrees
    assert len(head) == 32 and len(low) == 58
    assert PACKET_L_BYTES[14:] == _bits_to_bytes(head + low)
    assert frame.bit_length(**BITS) == 90
    assert encode_packet(PACKET_L, **BITS) == PACKET_L_BYTES
    assert len(PACKET_L_BYTES) == 14 + 12
    assert pack_frame(frame, **BITS) == PACKET_L_BYTES[14:]
    assert _decode(PACKET_L_BYTES) == PACKET_L
    assert unpack_frame(PACKET_L_BYTES[14:], **LIMITS) == frame
    decoded = _decode(PACKET_L_BYTES).frame
    assert decoded.lowband_layout == 1 and decoded.lowband == LOWBAND_L
    assert all(type(v) is int for v in decoded.lowband)


def test_layout_field_is_a_prefix_code() -> None:
    # n=1, gain 0, code 0: the field after the gain is 0 / 10 / 11
    for layout_id, field in [(0, "0"), (1, "10"), (2, "11")]:
        zero = (0,) * LAYOUTS[layout_id].bins if layout_id else ()
        frame = TokenFrame(1, 0, (0,), layout_id, zero)
        bits = _bytes_to_bits(pack_frame(frame, **BITS))
        assert bits[: 10 + len(field) + 10] == "0001" + "000000" + field + "0000000000"
        assert unpack_frame(pack_frame(frame, **BITS), **LIMITS) == frame


def test_v1_packets_and_files_are_rejected() -> None:
    error = _expect(ErrorCode.UNKNOWN_VERSION, _decode, PACKET_A_V1_BYTES)
    assert error.offset == 1
    _expect(ErrorCode.UNKNOWN_VERSION, _decode, PACKET_A_V1_BYTES[:2])
    for data in (FILE_V1_BYTES, FILE_V1_BYTES[:5]):
        error = _expect(ErrorCode.UNKNOWN_VERSION, read_bitstream, data)
        assert error.offset == 4
        _expect(ErrorCode.UNKNOWN_VERSION, decode_file_header, data)
    v1_json = {**packet_to_json(PACKET_A), "version": 1}
    _expect(ErrorCode.UNKNOWN_VERSION, packet_from_json, v1_json, **LIMITS)


def test_file_vector_writes_and_reads_exactly() -> None:
    writer = BitstreamWriter(FILE_HEADER)
    writer.add_frames(FILE_FRAMES)
    assert writer.getvalue() == FILE_BYTES
    assert writer.finalize() == FILE_BYTES
    assert writer.closed
    # the CRC field is the plain CRC-32 (zlib / IEEE 802.3) of the bytes before it
    assert FILE_BYTES[29:33] == struct.pack(">I", zlib.crc32(FILE_BYTES[:29]))
    assert STREAMED_FILE_BYTES[29:33] == struct.pack(">I", zlib.crc32(STREAMED_FILE_BYTES[:29]))
    assert FILE_BYTES[33:] == _bits_to_bytes("".join(_ref_bits(f) for f in FILE_FRAMES))
    header, frames = read_bitstream(FILE_BYTES)
    assert header == FILE_HEADER
    assert frames == FILE_FRAMES


def test_file_v3_vector_writes_and_reads_exactly() -> None:
    assert write_bitstream(FILE_V3_HEADER, FILE_V3_FRAMES) == FILE_V3_BYTES
    assert FILE_V3_BYTES[33:] == _bits_to_bytes(_ref_file_bits(FILE_V3_FRAMES))
    assert FILE_V3_BYTES[29:33] == struct.pack(">I", zlib.crc32(FILE_V3_BYTES[:29]))
    header, frames = read_bitstream(FILE_V3_BYTES)
    assert header == FILE_V3_HEADER and header.version == 3
    assert frames == FILE_V3_FRAMES
    # the first two frames cost 55 bits here and 52 in version 2 (their gains jump); the
    # last two, which repeat the mode with small gain steps, 49 instead of 62
    v2 = write_bitstream(FILE_HEADER, FILE_V3_FRAMES)
    assert len(v2) - 33 == (52 + 62 + 7) // 8 and len(FILE_V3_BYTES) - 33 == 104 // 8
    # streamed, and cut anywhere
    writer = BitstreamWriter(replace(FILE_V3_HEADER, num_frames=None))
    chunks = [writer.drain()]
    for frame in FILE_V3_FRAMES:
        writer.add(frame)
        chunks.append(writer.drain())
    chunks.append(writer.drain(final=True))
    streamed = b"".join(chunks)
    assert streamed[33:] == FILE_V3_BYTES[33:]
    assert read_bitstream(streamed) == (replace(FILE_V3_HEADER, num_frames=None), FILE_V3_FRAMES)
    for cut in range(len(FILE_V3_BYTES)):
        _expect(ErrorCode.TRUNCATED, read_bitstream, FILE_V3_BYTES[:cut])


def test_file_v3_gain_code_covers_every_step_and_wraps() -> None:
    """Every gain step from every gain round-trips (the short codes up to |7|, the index
    itself beyond); a delta a writer never emits still decodes, modulo 2**gain_bits, so
    every bit string is a valid gain."""
    for gain_bits in (1, 3, 6):
        top = 1 << gain_bits
        frames = [TokenFrame(1, g, (0,)) for a in range(top) for g in (a, *range(top))]
        data = pack_frame_stream(frames, code_bits=CODE_BITS, gain_bits=gain_bits)
        assert data == _bits_to_bytes(_ref_file_bits(frames, gain_bits=gain_bits))
        back = unpack_frame_stream(data, code_bits=CODE_BITS, gain_bits=gain_bits,
                                   max_codebooks=Q, count=len(frames))
        assert back.frames() == frames
    # gain 62, then "+7" (110 0 11): 69 wraps to 5
    bits = "0" + "111" + format(62, "06b") + "0" * 10 + "0" + "110011" + "0" * 10
    back = unpack_frame_stream(_bits_to_bytes(bits), **LIMITS, count=2)
    assert back.gain_index.tolist() == [62, 5]


def test_file_v3_payload_errors() -> None:
    head = FILE_V3_BYTES[:33]
    # frame 0 declares its mode: 1, count 0 / 13 (> Q = 12)
    for count in (0, 13):
        bits = "1" + format(count, "04b") + "0" + "00" + "0" * 10
        error = _expect(ErrorCode.BAD_FIELD, read_bitstream, head + _bits_to_bytes(bits))
        assert error.offset == 33 and "frame 0" in error.message
    _expect(ErrorCode.TRAILING_DATA, read_bitstream, FILE_V3_BYTES + b"\x00")
    _expect(ErrorCode.TRUNCATED, read_bitstream, head)  # the header says 4 frames


def test_file_vector_with_source_record() -> None:
    assert write_bitstream(SOURCE_FILE_HEADER, FILE_FRAMES) == SOURCE_FILE_BYTES
    assert SOURCE_FILE_BYTES[39:43] == struct.pack(">I", zlib.crc32(SOURCE_FILE_BYTES[:39]))
    assert STREAMED_SOURCE_FILE_BYTES[39:43] == struct.pack(
        ">I", zlib.crc32(STREAMED_SOURCE_FILE_BYTES[:39])
    )
    # the record sits between the model id and the CRC: the rest is the plain file's
    assert SOURCE_FILE_BYTES[8:29] == FILE_BYTES[8:29]
    assert SOURCE_FILE_BYTES[43:] == FILE_BYTES[33:]
    assert SOURCE_FILE_BYTES[29] == EXT_TAG_SOURCE
    header, frames = read_bitstream(SOURCE_FILE_BYTES)
    assert header == SOURCE_FILE_HEADER and header.source == SOURCE
    assert frames == FILE_FRAMES
    assert decode_file_header(SOURCE_FILE_BYTES) == (SOURCE_FILE_HEADER, 43)
    # streamed: the header (record included) goes out with the first drain
    writer = BitstreamWriter(SOURCE_FILE_HEADER)
    chunks = [writer.drain()]
    writer.add_frames(FILE_FRAMES)
    chunks.append(writer.drain(final=True))
    assert len(chunks[0]) == 43
    assert b"".join(chunks) == STREAMED_SOURCE_FILE_BYTES
    header, frames = read_bitstream(STREAMED_SOURCE_FILE_BYTES)
    assert header.source == SOURCE and header.num_frames is None and frames == FILE_FRAMES
    for cut in range(len(SOURCE_FILE_BYTES)):
        _expect(ErrorCode.TRUNCATED, read_bitstream, SOURCE_FILE_BYTES[:cut])


def test_source_info_range() -> None:
    SourceInfo(1, 0)
    SourceInfo(0xFFFFFFFF, 0xFFFFFFFF)
    for rate, samples in [(0, 10), (1 << 32, 10), (16000, -1), (16000, 1 << 32)]:
        with pytest.raises(ValueError, match="source"):
            SourceInfo(rate, samples)


def _extended(extension: bytes) -> bytes:
    """FILE_BYTES with `extension` as its header's extension area (CRC recomputed)."""
    body = _header_body(length=33 + len(extension)) + extension
    return _with_crc(body) + FILE_BYTES[33:]


SOURCE_RECORD = SOURCE_FILE_BYTES[29:39]


def test_extension_records_unknown_tags_are_skipped() -> None:
    unknown = bytes.fromhex("7f 03 61 62 63")  # tag 127, 3 bytes
    empty = bytes.fromhex("00 00")  # tag 0, no value
    for area, source in [
        (unknown, None),
        (empty + empty, None),
        (unknown + SOURCE_RECORD, SOURCE),
        (SOURCE_RECORD + unknown, SOURCE),
        (unknown + SOURCE_RECORD + empty, SOURCE),
        (bytes([0xEE, 255]) + bytes(255), None),  # the longest record value
    ]:
        header, frames = read_bitstream(_extended(area))
        assert header == replace(FILE_HEADER, source=source)
        assert frames == FILE_FRAMES
        assert decode_file_header(_extended(area))[1] == 33 + len(area)


@pytest.mark.parametrize(
    ("area", "code", "offset"),
    [
        (b"\x7f", ErrorCode.CORRUPT, 29),  # 1 byte: no room for tag + length
        (bytes.fromhex("7f 04 61 62 63"), ErrorCode.CORRUPT, 30),  # value overruns the area
        (SOURCE_RECORD[:-1], ErrorCode.CORRUPT, 30),  # source record cut short
        (SOURCE_RECORD + b"\x7f", ErrorCode.CORRUPT, 39),  # stray byte after a record
        (b"ext", ErrorCode.CORRUPT, 30),  # not records at all ('e', length 120)
        (bytes.fromhex("01 04 00 00 3e 80"), ErrorCode.BAD_FIELD, 30),  # source of 4 bytes
        (bytes.fromhex("01 09") + SOURCE_RECORD[2:] + b"\x00", ErrorCode.BAD_FIELD, 30),
        (bytes.fromhex("01 08 00 00 00 00 00 00 00 10"), ErrorCode.BAD_FIELD, 31),  # rate 0
        (SOURCE_RECORD + SOURCE_RECORD, ErrorCode.BAD_FIELD, 39),  # two source records
    ],
)
def test_extension_area_errors(area: bytes, code: ErrorCode, offset: int) -> None:
    error = _expect(code, read_bitstream, _extended(area))
    assert error.offset == offset, str(error)


def test_streamed_file_vector() -> None:
    writer = BitstreamWriter(FILE_HEADER)
    chunks = [writer.drain()]
    writer.add(FILE_FRAMES[0])
    chunks.append(writer.drain())
    assert chunks[-1] == FILE_BYTES[33:35]  # 21 bits written: 2 whole bytes
    writer.add(FILE_FRAMES[1])
    chunks.append(writer.drain())
    assert chunks[-1] == FILE_BYTES[35:39]  # 52 bits written: 4 more whole bytes
    chunks.append(writer.drain(final=True))
    assert chunks[-1] == FILE_BYTES[39:]  # the padded last byte
    assert b"".join(chunks) == STREAMED_FILE_BYTES
    assert len(chunks[0]) == 33  # header alone first
    header, frames = read_bitstream(STREAMED_FILE_BYTES)
    assert header.num_frames is None
    assert frames == FILE_FRAMES
    with pytest.raises(ValueError, match="closed"):
        writer.add(FILE_FRAMES[0])


def test_file_size_measures_the_bitrate() -> None:
    # 50 frames of 1 codebook = 50 × 21 bits = 1050 bits: 1.05 kbps for one second
    writer = BitstreamWriter(FILE_HEADER)
    writer.add_frames([TokenFrame(1, 5, (7,))] * 50)
    data = writer.finalize()
    assert len(data) - 33 == 132  # ceil(1050 / 8)
    assert writer.payload_bits == 1050
    assert [frame_bits(n, **BITS) for n in (1, 5, 11, 12)] == [21, 61, 121, 131]
    assert [payload_size(n, **BITS) for n in (1, 5, 11, 12)] == [3, 8, 16, 17]
    # the low band adds to that: the layout field grows to 2 bits, plus the pair codes
    writer = BitstreamWriter(FILE_HEADER)
    writer.add_frames([PACKET_L.frame] * 50)
    assert writer.payload_bits == 50 * 90
    assert len(writer.finalize()) - 33 == (50 * 90 + 7) // 8


def test_max_packet_size_includes_the_longest_low_band() -> None:
    # 12 codebooks: 131 bits; the longest low band: 1 more layout bit and the longest code of
    # every pair position of the layout whose longest codes add up to the most (layout 2)
    longest = {
        layout_id: sum(max(map(len, _ref_pair_code(layout_id, p))) for p in range(spec.bins // 2))
        for layout_id, spec in LAYOUTS.items()
    }
    assert longest == {1: 322, 2: 413}
    assert max_packet_size(max_codebooks=Q, **BITS) == 14 + 12 + (131 + 1 + 413 + 7) // 8 == 95
    assert max_packet_size(max_codebooks=Q, with_times=False, **BITS) == 83
    assert max_packet_size(max_codebooks=1, **BITS) == 14 + 12 + (21 + 1 + 413 + 7) // 8 == 81
    # the largest valid packet: 12 codebooks, every pair of layout 2 coded with a longest code
    m = LAYOUTS[2].max_index
    low: list[int] = []
    for p in range(LAYOUTS[2].bins // 2):
        codes = _ref_pair_code(2, p)
        a, b = divmod(max(range(len(codes)), key=lambda s: len(codes[s])), 2 * m + 1)
        low += (a - m, b - m)
    biggest = TokenPacket(
        1, 1, 1, TokenFrame(12, 63, (1023,) * 12, 2, tuple(low)), PacketTimes(1, 2, 3)
    )
    assert biggest.frame.bit_length(**BITS) == 131 + 1 + 413
    data = encode_packet(biggest, **BITS)
    assert len(data) == 95
    assert _decode(data) == biggest


def test_frame_payload_vectors() -> None:
    assert pack_frame(TokenFrame(1, 33, (1023,)), **BITS) == bytes.fromhex("185ff8")
    full = TokenFrame(12, 1, tuple(range(12)))
    assert pack_frame(full, **BITS) == _bits_to_bytes(_ref_bits(full))
    assert len(pack_frame(full, **BITS)) == 17
    assert unpack_frame(bytes.fromhex("185ff8"), **LIMITS) == TokenFrame(1, 33, (1023,))


# --------------------------------------------------------------------------- round trips


def test_random_packet_round_trips() -> None:
    rng = random.Random(1234)
    layouts = set()
    for _ in range(300):
        packet = _random_packet(rng)
        layouts.add(packet.frame.lowband_layout)
        data = encode_packet(packet, **BITS)
        header = 14 + (12 if packet.times else 0)
        assert data[header:] == _bits_to_bytes(_ref_bits(packet.frame))
        assert _decode(data) == packet
    assert layouts == {0, 1, 2}


def test_random_round_trips_other_widths() -> None:
    rng = random.Random(99)
    for code_bits, gain_bits, q in [(1, 1, 1), (16, 16, 15), (7, 3, 15), (11, 5, 4)]:
        for _ in range(40):
            frame = _random_frame(rng, q, code_bits, gain_bits)
            kw = {"code_bits": code_bits, "gain_bits": gain_bits}
            data = pack_frame(frame, **kw)
            assert data == _bits_to_bytes(_ref_bits(frame, code_bits, gain_bits))
            assert unpack_frame(data, max_codebooks=q, **kw) == frame
            packet = TokenPacket(1, 2, 3, frame)
            assert decode_packet(encode_packet(packet, **kw), max_codebooks=q, **kw) == packet


def test_lowband_extremes_round_trip() -> None:
    # every index at ±M, and alternating extremes, in both layouts
    for layout_id, spec in LAYOUTS.items():
        m, bins = spec.max_index, spec.bins
        for low in [
            (m,) * bins,
            (-m,) * bins,
            (m, -m) * (bins // 2),
            (-m, m) * (bins // 2),
            (0,) * bins,
        ]:
            frame = TokenFrame(1, 0, (0,), layout_id, low)
            data = pack_frame(frame, **BITS)
            assert data == _bits_to_bytes(_ref_bits(frame))
            assert unpack_frame(data, **LIMITS) == frame
            assert frame.bit_length(**BITS) == len(_ref_bits(frame))


def test_bit_length_is_the_packed_size() -> None:
    rng = random.Random(21)
    writer = BitstreamWriter(FILE_HEADER)
    total = 0
    for _ in range(200):
        frame = _random_frame(rng)
        bits = frame.bit_length(**BITS)
        assert bits == len(_ref_bits(frame))
        assert len(pack_frame(frame, **BITS)) == (bits + 7) // 8
        if frame.lowband_layout == 0:
            assert bits == frame_bits(frame.num_codebooks, **BITS)
        else:
            assert bits > frame_bits(frame.num_codebooks, **BITS) + 1
        writer.add(frame)
        total += bits
        assert writer.payload_bits == total
    for code_bits, gain_bits in [(1, 1), (16, 16)]:
        frame = _random_frame(rng, 4, code_bits, gain_bits)
        assert frame.bit_length(code_bits=code_bits, gain_bits=gain_bits) == len(
            _ref_bits(frame, code_bits, gain_bits)
        )


@pytest.mark.parametrize("version", FILE_FORMAT_VERSIONS)
def test_random_file_round_trips_with_streaming_drains(version: int) -> None:
    rng = random.Random(7)
    for trial in range(20):
        frames = [_random_frame(rng) for _ in range(rng.randint(0, 60))]
        if trial % 2:  # runs of one mode and small gain steps, as real streams have
            frames = _stream_like(frames, rng)
        header = BitstreamHeader("m" * trial, 16000, 320, CODE_BITS, GAIN_BITS, Q,
                                 version=version)
        writer = BitstreamWriter(header)
        chunks = []
        for frame in frames:
            writer.add(frame)
            if rng.random() < 0.3:
                chunks.append(writer.drain())
        complete = writer.getvalue()
        chunks.append(writer.drain(final=True))
        streamed = b"".join(chunks)
        payload = _bits_to_bytes(_ref_stream_bits(frames, version))
        assert complete.endswith(payload) and streamed.endswith(payload)
        assert len(complete) == len(streamed) == 26 + trial + len(payload)
        for data, count in ((complete, len(frames)), (streamed, None)):
            got_header, got = read_bitstream(data)
            assert got == frames
            assert got_header.num_frames == count
            assert got_header.model_id == "m" * trial
            assert got_header.version == version


def test_file_with_mixed_low_bands_round_trips() -> None:
    # no low band / layout 1 / layout 2 back to back, not byte-aligned
    rng = random.Random(31)
    frames = [PACKET_L.frame, *FILE_FRAMES]
    for layout_id in (0, 1, 2, 2, 1, 0, 1):
        low = _random_lowband(rng, layout_id) if layout_id else ()
        frames.append(TokenFrame(3, 7, (1, 2, 3), layout_id, low))
    data = write_bitstream(FILE_HEADER, frames)
    assert data[33:] == _bits_to_bytes("".join(_ref_bits(f) for f in frames))
    header, got = read_bitstream(data)
    assert got == frames and header.num_frames == len(frames)
    _, arrays = read_bitstream_arrays(data)
    assert arrays.lowband_layout.tolist() == [f.lowband_layout for f in frames]
    assert arrays.frames() == frames


@pytest.mark.parametrize("version", FILE_FORMAT_VERSIONS)
def test_frame_stream_matches_reference(version: int) -> None:
    rng = random.Random(5)
    frames = _stream_like([_random_frame(rng) for _ in range(200)], rng)
    expected = _bits_to_bytes(_ref_stream_bits(frames, version))
    arrays = FrameArrays.from_frames(frames, Q)
    assert pack_frame_stream(arrays, **BITS, version=version) == expected
    assert pack_frame_stream(frames, **BITS, version=version) == expected
    assert pack_frame_stream([], **BITS, version=version) == b""
    back = unpack_frame_stream(expected, count=200, **LIMITS, version=version)
    assert back.codes.shape == (200, Q) and back.codes.dtype == np.int64
    assert back.lowband.shape == (200, MAX_LOWBAND_BINS) and back.lowband.dtype == np.int64
    assert back.frames() == frames
    np.testing.assert_array_equal(back.codes, arrays.codes)
    np.testing.assert_array_equal(back.gain_index, arrays.gain_index)
    np.testing.assert_array_equal(back.lowband_layout, arrays.lowband_layout)
    np.testing.assert_array_equal(back.lowband, arrays.lowband)
    # count unknown
    assert unpack_frame_stream(expected, **LIMITS, version=version).frames() == frames
    with pytest.raises(ValueError, match="version"):
        pack_frame_stream(frames, **BITS, version=1)
    with pytest.raises(ValueError, match="version"):
        unpack_frame_stream(expected, **LIMITS, version=4)


def test_frame_arrays_with_low_bands() -> None:
    m2, bins2 = LAYOUTS[2].max_index, LAYOUTS[2].bins
    low2 = (m2, -m2) + (0,) * (bins2 - 3) + (5,)
    frames = [
        TokenFrame(2, 3, (4, 5)),
        TokenFrame(1, 0, (9,), 1, LOWBAND_L),
        TokenFrame(3, 63, (1, 2, 3), 2, low2),
    ]
    arrays = FrameArrays.from_frames(frames, Q)
    assert MAX_LOWBAND_BINS == max(spec.bins for spec in LAYOUTS.values()) == bins2
    assert arrays.lowband_layout.dtype == np.int64 and arrays.lowband.dtype == np.int64
    np.testing.assert_array_equal(arrays.lowband_layout, [0, 1, 2])
    # each row: the frame's indices, then zeros up to MAX_LOWBAND_BINS
    expected = np.zeros((3, MAX_LOWBAND_BINS), dtype=np.int64)
    expected[1, : len(LOWBAND_L)], expected[2, :bins2] = LOWBAND_L, low2
    np.testing.assert_array_equal(arrays.lowband, expected)
    assert arrays.frames() == frames
    assert all(type(v) is int for f in arrays.frames() for v in f.lowband)
    # the low-band arrays may be left out: frames without low band
    plain = FrameArrays(arrays.num_codebooks[:1], arrays.gain_index[:1], arrays.codes[:1])
    np.testing.assert_array_equal(plain.lowband_layout, [0])
    assert plain.lowband.shape == (1, MAX_LOWBAND_BINS) and not plain.lowband.any()
    assert plain.frames() == frames[:1]
    empty = FrameArrays.from_frames([], Q)
    assert len(empty) == 0 and empty.lowband.shape == (0, MAX_LOWBAND_BINS)


def test_read_bitstream_arrays_feed_the_decoder_layout() -> None:
    header, arrays = read_bitstream_arrays(FILE_BYTES)
    assert header.frame_rate == 50.0 and header.frame_ms == 20.0
    np.testing.assert_array_equal(arrays.num_codebooks, [1, 2])
    np.testing.assert_array_equal(arrays.gain_index, [33, 0])
    expected = np.zeros((2, Q), dtype=np.int64)
    expected[0, 0], expected[1, 1] = 1023, 5
    np.testing.assert_array_equal(arrays.codes, expected)
    np.testing.assert_array_equal(arrays.lowband_layout, [0, 0])
    np.testing.assert_array_equal(arrays.lowband, np.zeros((2, MAX_LOWBAND_BINS)))
    assert len(arrays) == 2


def test_bit_writer_and_reader_round_trip() -> None:
    rng = random.Random(3)
    fields = []
    for _ in range(500):
        width = rng.randint(0, 70)
        fields.append((rng.randrange(1 << width) if width else 0, width))
    writer = BitWriter()
    for value, width in fields:
        writer.write(value, width)
    data = writer.getvalue()
    bits = "".join(format(v, f"0{w}b") if w else "" for v, w in fields)
    assert writer.bit_length == len(bits)
    assert data == _bits_to_bytes(bits)
    assert writer.complete_bytes() == data[: len(bits) // 8]
    reader = BitReader(data, end_bit=len(bits))
    for value, width in fields:
        assert reader.read(width) == value
    assert reader.remaining == 0
    _expect(ErrorCode.TRUNCATED, reader.read, 1)
    with pytest.raises(ValueError):
        writer.write(4, 2)
    peek = BitReader(b"\xa5")
    assert peek.peek(3) == 0b101 and peek.position == 0
    peek.skip(4)
    assert peek.read(4) == 0b0101


def test_token_frame_helpers() -> None:
    row = np.arange(12, dtype=np.int64) * 3
    frame = TokenFrame.from_codes(row, np.int64(9), 5)  # type: ignore[arg-type]
    assert frame == TokenFrame(5, 9, (0, 3, 6, 9, 12))
    assert all(type(c) is int for c in frame.codes)
    assert (frame.lowband_layout, frame.lowband) == (LOWBAND_LAYOUT_NONE, ()) == (0, ())
    np.testing.assert_array_equal(frame.codes_array(Q), [0, 3, 6, 9, 12] + [0] * 7)
    assert TokenFrame(2, 0, [4, 5]) == TokenFrame(2, 0, (4, 5))  # type: ignore[arg-type]
    for bad in [(0, 0, ()), (16, 0, (0,) * 16), (2, 0, (1,)), (1, -1, (0,)), (1, 0, (-1,))]:
        with pytest.raises(ValueError):
            TokenFrame(*bad)
    with pytest.raises(ValueError):
        TokenFrame.from_codes([1, 2], 0, 3)
    # a low band from an encoder output row (any integer array) is stored as Python ints
    low = TokenFrame.from_codes(row, 9, 1, 1, np.asarray(LOWBAND_L, dtype=np.int64))
    assert low == TokenFrame(1, 9, (0,), 1, LOWBAND_L)
    assert type(low.lowband) is tuple and all(type(v) is int for v in low.lowband)
    listed = TokenFrame(1, 9, (0,), 1, list(LOWBAND_L))  # type: ignore[arg-type]
    assert listed == low


@pytest.mark.parametrize(
    ("layout_id", "lowband", "match"),
    [
        (1, (0,) * (BINS1 - 1), f"has {BINS1} bins"),  # wrong length
        (1, (0,) * (BINS1 + 1), f"has {BINS1} bins"),
        (2, (), f"has {BINS2} bins"),
        (2, (0,) * BINS1, f"has {BINS2} bins"),  # layout 1's size
        (1, (0,) * BINS2, f"has {BINS1} bins"),
        (1, (M1 + 1,) + (0,) * (BINS1 - 1), "outside"),  # |index| > M
        (1, (0,) * (BINS1 - 1) + (-M1 - 1,), "outside"),
        (2, (0,) * 5 + (M2 + 1,) + (0,) * (BINS2 - 6), "outside"),
        (2, (-M2 - 1,) + (0,) * (BINS2 - 1), "outside"),
        (3, (0,) * BINS1, "unknown lowband_layout"),
        (-1, (0,) * BINS1, "unknown lowband_layout"),
        ("1", (0,) * BINS1, "must be an int"),
        (True, (0,) * BINS1, "must be an int"),  # a bool is not a layout id
        (1.0, (0,) * BINS1, "must be an int"),
        (np.float64(1.0), (0,) * BINS1, "must be an int"),
        (np.bool_(True), (0,) * BINS1, "must be an int"),
        (None, (), "must be an int"),
        (0, (0,) * BINS1, "layout 0"),  # values given without a layout
        (0, (0,), "layout 0"),
    ],
)
def test_token_frame_lowband_validation(
    layout_id: object, lowband: tuple[int, ...], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        TokenFrame(1, 0, (0,), layout_id, lowband)  # type: ignore[arg-type]


def test_token_frame_lowband_limits_are_valid() -> None:
    for layout_id, spec in LAYOUTS.items():
        m = spec.max_index
        TokenFrame(1, 0, (0,), layout_id, (m, -m) * (spec.bins // 2))
    assert TokenFrame(1, 0, (0,), 2, (M2,) * BINS2).lowband == (M2,) * BINS2
    assert M2 > M1
    with pytest.raises(ValueError, match="outside"):
        TokenFrame(1, 0, (0,), 1, (M2,) * BINS1)  # valid in layout 2, not in layout 1


def test_token_frame_layout_id_types() -> None:
    # a numpy integer layout id (an encoder output row, an array element) is stored as an int
    for layout_id in (np.int64(1), np.int32(1), np.uint8(1), np.intp(1)):
        frame = TokenFrame(1, 0, (0,), layout_id, LOWBAND_L)  # type: ignore[arg-type]
        assert type(frame.lowband_layout) is int and frame.lowband_layout == 1
        assert frame == TokenFrame(1, 0, (0,), 1, LOWBAND_L)
        assert hash(frame) == hash(TokenFrame(1, 0, (0,), 1, LOWBAND_L))
        assert pack_frame(frame, **BITS) == pack_frame(TokenFrame(1, 0, (0,), 1, LOWBAND_L), **BITS)
        assert frame_to_json(frame)["lowband"] == {"layout": 1, "indices": list(LOWBAND_L)}
        assert type(frame_to_json(frame)["lowband"]["layout"]) is int  # type: ignore[index]
    none = TokenFrame(1, 0, (0,), np.int64(0))  # type: ignore[arg-type]
    assert type(none.lowband_layout) is int and none == TokenFrame(1, 0, (0,))
    arrays = FrameArrays.from_frames([PACKET_L.frame], Q)
    # from an array row: arrays.lowband_layout[0] is an np.int64
    layout0, low0 = arrays.lowband_layout[0], arrays.lowband[0, :BINS1]
    row = TokenFrame.from_codes(arrays.codes[0], 17, 2, layout0, low0)
    assert row == PACKET_L.frame and type(row.lowband_layout) is int
    # a bool or a float is not a layout id, even when it equals one
    for bad in (True, False, 1.0, 2.0, np.float32(1.0), np.bool_(True)):
        with pytest.raises(ValueError, match="lowband_layout must be an int"):
            TokenFrame(1, 0, (0,), bad, LOWBAND_L if bad else ())  # type: ignore[arg-type]


def test_encoding_rejects_values_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="gain_index 64"):
        pack_frame(TokenFrame(1, 64, (0,)), **BITS)
    with pytest.raises(ValueError, match="code 1024"):
        encode_packet(TokenPacket(0, 0, 0, TokenFrame(1, 0, (1024,))), **BITS)
    with pytest.raises(ValueError, match="code 1024"):
        pack_frame(TokenFrame(1, 0, (1024,), 1, LOWBAND_L), **BITS)
    for bad in [{"seq": 65536}, {"seq": -1}, {"stream_id": 1 << 32}, {"timestamp_us": -1}]:
        fields = {"stream_id": 0, "seq": 0, "timestamp_us": 0, **bad}
        with pytest.raises(ValueError):
            TokenPacket(frame=TokenFrame(1, 0, (0,)), **fields)
    with pytest.raises(ValueError):
        PacketTimes(1 << 32)
    with pytest.raises(ValueError):
        pack_frame(TokenFrame(1, 0, (0,)), code_bits=0, gain_bits=6)
    with pytest.raises(ValueError):
        _decode(PACKET_A_BYTES, max_codebooks=16)
    writer = BitstreamWriter(BitstreamHeader("x", 16000, 320, CODE_BITS, GAIN_BITS, 2))
    with pytest.raises(ValueError, match="Q is 2"):
        writer.add(TokenFrame(3, 0, (0, 0, 0)))
    with pytest.raises(ValueError):
        BitstreamHeader("é" * 33, 16000, 320, 10, 6, 12)  # 66 bytes of UTF-8


def test_bitstream_writer_rejected_frame_leaves_no_bits() -> None:
    writer = BitstreamWriter(FILE_HEADER)
    with pytest.raises(ValueError, match="code 1024"):
        writer.add(TokenFrame(1, 0, (1024,)))
    assert writer.payload_bits == 0 and writer.num_frames == 0
    writer.add_frames(FILE_FRAMES)
    assert writer.finalize() == FILE_BYTES


# --------------------------------------------------------------------------- low-band codes


def test_lowband_layouts_are_pinned() -> None:
    # (bins, step, M) of each layout: a format constant (the decoder dequantises index * step)
    assert {i: (s.bins, s.step, s.max_index) for i, s in LAYOUTS.items()} == {
        1: (32, 3.5, 6),
        2: (40, 1.25, 16),
    }
    assert {i: s.symbols for i, s in LAYOUTS.items()} == {1: 13 * 13, 2: 33 * 33}
    assert FLOOR == 4096
    assert LOWBAND_LAYOUT_NONE == 0 and MAX_LOWBAND_BINS == 40
    for layout_id, (bins, step, _, marginals) in MARGINALS.items():
        spec = LAYOUTS[layout_id]
        assert (spec.bins, spec.step) == (bins, step)
        assert len(marginals) == bins
        assert all(len(c) == spec.max_index + 1 and min(c) >= 1 for c in marginals)


def test_lowband_codes_match_the_documented_construction() -> None:
    # canonical Huffman from c1[|a|] * c2[|b|] + 4096, ties by node creation order, codes by
    # (length, symbol): an independent construction gives the same code for every symbol
    for layout_id, spec in LAYOUTS.items():
        for pair in range(spec.bins // 2):
            code = spec.pair_code(pair)
            got = tuple(format(c, f"0{n}b") for c, n in zip(code.codes, code.lengths, strict=True))
            assert got == _ref_pair_code(layout_id, pair), (layout_id, pair)


def test_lowband_codes_are_complete_prefix_codes() -> None:
    for layout_id, spec in LAYOUTS.items():
        for pair in range(spec.bins // 2):
            code = spec.pair_code(pair)
            assert len(code.lengths) == spec.symbols
            top = max(code.lengths)
            assert top == code.max_length <= 32
            # Kraft sum exactly 1: every bit string starts with exactly one code word
            assert sum(1 << (top - n) for n in code.lengths) == 1 << top, (layout_id, pair)
            pairs = zip(code.codes, code.lengths, strict=True)
            words = sorted(format(c, f"0{n}b") for c, n in pairs)
            assert len(set(words)) == len(words)
            # sorted, a prefix of a word would come right before it
            assert not any(b.startswith(a) for a, b in itertools.pairwise(words))


@pytest.mark.parametrize(
    ("layout_id", "pair"),
    [(1, 0), (1, 7), (1, BINS1 // 2 - 1), (2, 0), (2, 15), (2, BINS2 // 2 - 1)],
)
def test_lowband_codes_decode_what_they_encode(layout_id: int, pair: int) -> None:
    spec = LAYOUTS[layout_id]
    code = spec.pair_code(pair)
    m, width = spec.max_index, 2 * spec.max_index + 1
    # every symbol alone, its code word filling the input exactly (no look-ahead bits)
    for symbol in range(spec.symbols):
        a, b = divmod(symbol, width)
        indices = [0] * spec.bins
        indices[2 * pair], indices[2 * pair + 1] = a - m, b - m
        writer = BitWriter()
        spec.encode(np.asarray(indices, dtype=np.int64), writer)
        assert writer.bit_length == spec.coded_bits(np.asarray(indices, dtype=np.int64))
        data = writer.getvalue()
        reader = BitReader(data, end_bit=writer.bit_length)
        assert spec.decode(reader) == tuple(indices)
        assert reader.remaining == 0
        # the pair's own bits are its code word
        start = sum(len(_ref_pair_code(layout_id, p)[m * width + m]) for p in range(pair))
        word = _bytes_to_bits(data)[start : start + code.lengths[symbol]]
        assert word == format(code.codes[symbol], f"0{code.lengths[symbol]}b")


def test_lowband_decoder_follows_any_bit_string() -> None:
    # the codes are complete: any bits decode to a low band (only running out is an error)
    rng = random.Random(17)
    for layout_id, spec in LAYOUTS.items():
        for _ in range(50):
            data = bytes(rng.randrange(256) for _ in range(64))
            reader = BitReader(data)
            low = spec.decode(reader)
            assert len(low) == spec.bins and max(map(abs, low)) <= spec.max_index
            assert _ref_lowband_bits(layout_id, low) == _bytes_to_bits(data)[: reader.position]


@pytest.mark.parametrize("layout_id", sorted(LAYOUTS))
def test_lowband_truncated_at_every_bit(layout_id: int) -> None:
    spec = LAYOUTS[layout_id]
    rng = random.Random(layout_id)
    fixed = LOWBAND_L + (0,) * (spec.bins - len(LOWBAND_L))  # packet L's indices, zero-extended
    for low in [fixed, *(_random_lowband(rng, layout_id) for _ in range(4))]:
        bits = _ref_lowband_bits(layout_id, low)
        data = _bits_to_bytes(bits) + b"\x00"  # bits past end_bit must not be read
        assert spec.decode(BitReader(data, end_bit=len(bits))) == low
        for cut in range(len(bits)):
            _expect(ErrorCode.TRUNCATED, spec.decode, BitReader(data, end_bit=cut))


def test_lowband_encode_rejects_bad_indices() -> None:
    spec = LAYOUTS[1]
    with pytest.raises(ValueError, match="32 indices"):
        spec.encode(np.zeros(30, dtype=np.int64), BitWriter())
    with pytest.raises(ValueError, match="outside"):
        spec.encode(np.full(32, -7, dtype=np.int64), BitWriter())


def test_lowband_code_tables_digest() -> None:
    lengths = b"".join(
        bytes(LAYOUTS[layout_id].pair_code(pair).lengths)
        for layout_id in sorted(LAYOUTS)
        for pair in range(LAYOUTS[layout_id].bins // 2)
    )
    assert hashlib.sha256(lengths).hexdigest() == LOWBAND_CODE_DIGEST, (
        "the low-band Huffman codes changed: that is a new wire and file format; "
        "bump PROTOCOL_VERSION and FILE_FORMAT_VERSION (and docs/protocol.md, this digest)"
    )


# --------------------------------------------------------------------------- malformed packets


@pytest.mark.parametrize("vector", [PACKET_A_BYTES, PACKET_B_BYTES, PACKET_L_BYTES])
def test_packet_truncated_at_every_offset(vector: bytes) -> None:
    for cut in range(len(vector)):
        error = _expect(ErrorCode.TRUNCATED, _decode, vector[:cut])
        assert error.offset is not None


def test_lowband_frame_truncated_at_every_byte() -> None:
    rng = random.Random(8)
    frames = [PACKET_L.frame] + [
        TokenFrame(2, 1, (3, 4), layout_id, _random_lowband(rng, layout_id))
        for layout_id in (1, 2, 2)
    ]
    for frame in frames:
        payload = pack_frame(frame, **BITS)
        packet = encode_packet(TokenPacket(1, 2, 3, frame, PacketTimes(4)), **BITS)
        for cut in range(len(payload)):
            error = _expect(ErrorCode.TRUNCATED, unpack_frame, payload[:cut], **LIMITS)
            assert error.offset == cut
            _expect(ErrorCode.TRUNCATED, _decode, packet[: 26 + cut])
    # in a file, frames are not byte-aligned: cut after every byte of the stream
    data = write_bitstream(replace(FILE_HEADER, num_frames=None), frames)
    for cut in range(len(data)):
        _expect(ErrorCode.TRUNCATED, read_bitstream, data[:cut])
    # streamed: the frame count is unknown, a cut inside a frame is still truncated
    streamed = BitstreamWriter(FILE_HEADER)
    head = streamed.drain()
    streamed.add_frames(frames)
    whole = head + streamed.drain(final=True)
    assert read_bitstream(whole)[1] == frames
    ends = np.cumsum([f.bit_length(**BITS) for f in frames]).tolist()
    for cut in range(34, len(whole)):
        bits = (cut - 33) * 8
        done = [end for end in ends if 0 <= bits - end < 8]
        if not done:
            _expect(ErrorCode.TRUNCATED, read_bitstream, whole[:cut])
            continue
        # cut less than a byte after the end of frame k: frames 0..k and non-zero padding
        try:
            assert read_bitstream(whole[:cut])[1] == frames[: ends.index(done[0]) + 1]
        except ProtocolError as exc:
            assert exc.code == ErrorCode.CORRUPT, str(exc)


def test_packet_bad_magic_version_type_flags() -> None:
    data = bytearray(PACKET_A_BYTES)
    for value in (0x00, 0xC4, 0xFF, ord("{")):
        data[0] = value
        _expect(ErrorCode.BAD_MAGIC, _decode, bytes(data))
    _expect(ErrorCode.BAD_MAGIC, _decode, b"\x00")
    data = bytearray(PACKET_A_BYTES)
    for value in (0, 1, 3, 255):
        data[1] = value
        error = _expect(ErrorCode.UNKNOWN_VERSION, _decode, bytes(data))
        assert error.offset == 1
    # a future version is reported as such even when only two bytes arrived
    _expect(ErrorCode.UNKNOWN_VERSION, _decode, b"\xc5\x03")
    data = bytearray(PACKET_A_BYTES)
    for value in (0, 2, 0xFF):
        data[2] = value
        _expect(ErrorCode.UNKNOWN_TYPE, _decode, bytes(data))
    data = bytearray(PACKET_A_BYTES)
    for value in (0x02, 0x80, 0xFE):
        data[3] = value
        _expect(ErrorCode.BAD_FIELD, _decode, bytes(data))


def test_packet_oversized() -> None:
    limit = max_packet_size(max_codebooks=Q, **BITS)
    assert limit == 95
    _expect(ErrorCode.OVERSIZED, _decode, PACKET_A_BYTES + bytes(limit))
    _expect(ErrorCode.OVERSIZED, _decode, b"x" * (limit + 1))  # checked before the magic
    _expect(ErrorCode.OVERSIZED, _decode, PACKET_A_BYTES, max_bytes=16)
    assert _decode(PACKET_A_BYTES, max_bytes=17) == PACKET_A
    _expect(ErrorCode.OVERSIZED, _decode, PACKET_L_BYTES, max_bytes=25)
    assert _decode(PACKET_L_BYTES, max_bytes=26) == PACKET_L
    # the largest packet without low band: 14 + 12 + ceil(131 / 8) = 43 bytes
    biggest = TokenPacket(1, 1, 1, TokenFrame(12, 63, (1023,) * 12), PacketTimes(1, 2, 3))
    assert len(encode_packet(biggest, **BITS)) == 43
    assert _decode(encode_packet(biggest, **BITS)) == biggest


def test_packet_num_codebooks_out_of_range() -> None:
    header = PACKET_A_BYTES[:14]
    zero = header + bytes.fromhex("0840")  # n=0
    error = _expect(ErrorCode.BAD_FIELD, _decode, zero)
    assert error.offset == 14 and "num_codebooks 0" in error.message
    thirteen = TokenPacket(1, 1, 1, TokenFrame(13, 1, (1,) * 13))
    data = encode_packet(thirteen, **BITS)
    _expect(ErrorCode.BAD_FIELD, _decode, data)  # model Q = 12
    assert decode_packet(data, **BITS, max_codebooks=13) == thirteen
    # a session limited to 5 codebooks rejects 6
    six = encode_packet(TokenPacket(1, 1, 1, TokenFrame(6, 1, (1,) * 6)), **BITS)
    _expect(ErrorCode.BAD_FIELD, _decode, six, max_codebooks=5, max_bytes=100)
    # ... with a low band too (the count comes first)
    _expect(ErrorCode.BAD_FIELD, _decode, PACKET_L_BYTES, max_codebooks=1)


def test_packet_trailing_data_and_padding() -> None:
    error = _expect(ErrorCode.TRAILING_DATA, _decode, PACKET_A_BYTES + b"\x00")
    assert error.offset == 17
    _expect(ErrorCode.TRAILING_DATA, _decode, PACKET_B_BYTES + b"\x00\x00")
    error = _expect(ErrorCode.TRAILING_DATA, _decode, PACKET_L_BYTES + b"\x00")
    assert error.offset == 26
    for pad in (0x01, 0x04, 0x07):  # the 3 low bits of the last byte are padding
        data = PACKET_A_BYTES[:-1] + bytes([0xF8 | pad])
        _expect(ErrorCode.CORRUPT, _decode, data)
    assert PACKET_L_BYTES[-1] == 0xC0
    for pad in (0x01, 0x20, 0x3F):  # 2 bits of code (11), then 6 padding bits
        error = _expect(ErrorCode.CORRUPT, _decode, PACKET_L_BYTES[:-1] + bytes([0xC0 | pad]))
        assert error.offset == 25
    # the last code bit of the low band is not padding: clearing it changes pair 15
    changed = _decode(PACKET_L_BYTES[:-1] + b"\x80")
    assert changed.frame.lowband[:30] == LOWBAND_L[:30]
    assert changed.frame.lowband[30:] != LOWBAND_L[30:]


def test_protocol_error_shape() -> None:
    error = _expect(ErrorCode.TRUNCATED, _decode, PACKET_A_BYTES[:5])
    assert isinstance(error, ValueError)
    assert error.code == "truncated"  # ErrorCode is a str enum
    assert str(error).startswith("truncated: ")
    clone = pickle.loads(pickle.dumps(error))
    assert (clone.code, clone.message, clone.offset) == (error.code, error.message, error.offset)
    assert {c.value for c in ErrorCode} == {
        "truncated", "bad_magic", "unknown_version", "unknown_type",
        "oversized", "corrupt", "bad_field", "trailing_data",
    }  # fmt: skip


# --------------------------------------------------------------------------- malformed files


def test_file_truncated_at_every_offset() -> None:
    for cut in range(len(FILE_BYTES)):
        _expect(ErrorCode.TRUNCATED, read_bitstream, FILE_BYTES[:cut])
    # a streamed file cut inside a frame is truncated too
    cut_inside = STREAMED_FILE_BYTES[:-3]
    _expect(ErrorCode.TRUNCATED, read_bitstream, cut_inside)


def test_file_bad_magic_and_version() -> None:
    _expect(ErrorCode.BAD_MAGIC, read_bitstream, b"RIFF" + FILE_BYTES[4:])
    _expect(ErrorCode.BAD_MAGIC, read_bitstream, b"CSX")
    _expect(ErrorCode.BAD_MAGIC, read_bitstream, PACKET_A_BYTES)
    for version in (0, 1, 4, 255):
        data = FILE_BYTES[:4] + bytes([version]) + FILE_BYTES[5:]
        _expect(ErrorCode.UNKNOWN_VERSION, read_bitstream, data)
    # a version-1 header with a correct CRC is still version 1
    v1 = _with_crc(_header_body(version=1)) + FILE_BYTES[33:]
    _expect(ErrorCode.UNKNOWN_VERSION, read_bitstream, v1)


def test_file_corrupt_crc() -> None:
    # flipping any bit of the header after the version and length fields breaks the CRC
    for offset in list(range(8, 33)):
        data = bytearray(FILE_BYTES)
        data[offset] ^= 0x10
        _expect(ErrorCode.CORRUPT, read_bitstream, bytes(data))
    data = bytearray(FILE_BYTES)
    data[5] ^= 0x01  # flags
    _expect(ErrorCode.CORRUPT, read_bitstream, bytes(data))


def test_file_header_lengths() -> None:
    _expect(ErrorCode.OVERSIZED, decode_file_header, _with_crc(_header_body(length=1025)))
    _expect(ErrorCode.CORRUPT, decode_file_header, _with_crc(_header_body(length=32)))
    _expect(ErrorCode.OVERSIZED, read_bitstream, FILE_BYTES, max_bytes=39)
    assert read_bitstream(FILE_BYTES, max_bytes=40)[1] == FILE_FRAMES
    # an extension area between model id and CRC (covered by the CRC) holds records; an
    # unknown one (tag 0xEE, 1 byte) is skipped
    body = _header_body(length=26 + 7 + 3) + b"\xee\x01x"
    extended = _with_crc(body) + FILE_BYTES[33:]
    header, frames = read_bitstream(extended)
    assert header == FILE_HEADER and frames == FILE_FRAMES
    assert decode_file_header(extended)[1] == 36


@pytest.mark.parametrize(
    "fields",
    [
        {"flags": 1},
        {"rate": 0},
        {"fsize": 0},
        {"cbits": 0},
        {"cbits": 17},
        {"gbits": 0},
        {"q": 0},
        {"q": 16},
        {"model_id": b"\xff\xfe"},
        {"model_id": b"m" * 65},
    ],
)
def test_file_header_bad_fields(fields: dict[str, object]) -> None:
    data = _with_crc(_header_body(**fields)) + FILE_BYTES[33:]  # type: ignore[arg-type]
    _expect(ErrorCode.BAD_FIELD, read_bitstream, data)


def test_file_payload_errors() -> None:
    header = FILE_BYTES[:33]
    _expect(ErrorCode.TRAILING_DATA, read_bitstream, FILE_BYTES + b"\x00")
    _expect(ErrorCode.CORRUPT, read_bitstream, FILE_BYTES[:-1] + b"\x51")  # padding bit set
    # frame 0 claims 0 codebooks
    error = _expect(ErrorCode.BAD_FIELD, read_bitstream, header + bytes.fromhex("085ff9000000 50"))
    assert error.offset == 33
    # frame 1 claims 13 codebooks (> Q = 12): its count is bits 21..24 of the stream, the 3
    # low bits of byte 2 and the top bit of byte 3: 110|1
    data = bytearray(FILE_BYTES)
    data[35] = (data[35] & 0xF8) | 0b110
    data[36] |= 0x80
    error = _expect(ErrorCode.BAD_FIELD, read_bitstream, bytes(data))
    assert error.offset == 35 and "frame 1" in error.message
    # streamed files: a stray full byte after the last frame cannot be a frame
    _expect(ErrorCode.BAD_FIELD, read_bitstream, STREAMED_FILE_BYTES + b"\x00")
    empty = BitstreamWriter(FILE_HEADER)
    assert read_bitstream(empty.finalize()) == (
        BitstreamHeader("cs-test", 16000, 320, 10, 6, 12, num_frames=0, version=2),
        [],
    )
    _expect(ErrorCode.TRUNCATED, read_bitstream, FILE_BYTES[:33])  # header says 2 frames


def test_header_encode_decode_round_trip() -> None:
    for header in [
        FILE_HEADER,
        BitstreamHeader("", 8000, 160, 1, 1, 1, 0),  # the smallest widths need a count
        BitstreamHeader("", 8000, 160, 5, 1, 1, None),  # the smallest streamable widths
        BitstreamHeader("ü" * 32, 48000, 960, 16, 16, 15, UNKNOWN_FRAME_COUNT - 1),
        SOURCE_FILE_HEADER,
        BitstreamHeader("m" * 64, 8000, 160, 1, 1, 1, 7, SourceInfo(0xFFFFFFFF, 0)),
    ]:
        for version in FILE_FORMAT_VERSIONS:
            data = encode_file_header(replace(header, version=version))
            assert data[4] == version
            assert decode_file_header(data) == (replace(header, version=version), len(data))
    assert BitstreamHeader("m", 16000, 320, 10, 6, 12).version == FILE_FORMAT_VERSION
    with pytest.raises(ValueError, match="version"):
        BitstreamHeader("m", 16000, 320, 10, 6, 12, version=1)


# A version-3 header with 1-bit codes and gains (L = 0, no extension): 16 kHz, 320 samples,
# code bits 1, gain bits 1, Q 1, then the CRC.  Two frames (n = 1, gain 0, code 0) and
# (n = 1, gain 0, code 1) take 4 bits each: mode `0`, gain `00`, code: 0000 0001 = 01.
SMALL_COUNTED_FILE = bytes.fromhex(
    "43 53 54 52 03 00 00 1a 00 00 3e 80 00 00 00 02 01 40 01 01 01 00"  # 2 frames
    "c9 6e 9a 48"  # CRC32
    "01"
)
SMALL_STREAMED_FILE = bytes.fromhex(
    "43 53 54 52 03 00 00 1a 00 00 3e 80 ff ff ff ff 01 40 01 01 01 00"  # frame count unknown
    "42 84 1c e8"  # CRC32
    "01"
)
SMALL_FRAMES = [TokenFrame(1, 0, (0,)), TokenFrame(1, 0, (1,))]


def test_small_widths_read_with_a_frame_count() -> None:
    header = BitstreamHeader("", 16000, 320, 1, 1, 1, num_frames=2)
    assert read_bitstream(SMALL_COUNTED_FILE) == (header, SMALL_FRAMES)
    assert write_bitstream(header, SMALL_FRAMES) == SMALL_COUNTED_FILE


def test_streamed_file_with_frames_under_8_bits_is_rejected() -> None:
    # 4-bit frames: the final byte could hold 2 frames, or 1 frame and 4 bits of padding
    error = _expect(ErrorCode.BAD_FIELD, read_bitstream, SMALL_STREAMED_FILE)
    assert error.offset == 12
    assert error.message == (
        "a streamed file needs frames of at least 8 bits, but with code_bits 1, gain_bits 1 "
        "a version-3 frame can take 4"
    )
    _expect(ErrorCode.BAD_FIELD, decode_file_header, SMALL_STREAMED_FILE[:26])


def test_writers_refuse_streamed_files_with_frames_under_8_bits() -> None:
    header = BitstreamHeader("", 16000, 320, 1, 1, 1)
    writer = BitstreamWriter(header)
    writer.add_frames(SMALL_FRAMES)
    with pytest.raises(ValueError, match="at least 8 bits"):
        writer.drain()
    with pytest.raises(ValueError, match="at least 8 bits"):
        encode_file_header(header)
    assert writer.getvalue() == SMALL_COUNTED_FILE  # with its frame count it is fine
    with pytest.raises(ValueError, match="at least 8 bits"):
        unpack_frame_stream(b"\x01", code_bits=1, gain_bits=1, max_codebooks=1)
    counted = unpack_frame_stream(b"\x01", code_bits=1, gain_bits=1, max_codebooks=1, count=2)
    assert counted.frames() == SMALL_FRAMES


@pytest.mark.parametrize(
    ("version", "code_bits", "gain_bits", "streamable"),
    [
        (3, 4, 16, False),  # 3 + 4 = 7 bits
        (3, 5, 1, True),  # 3 + 5 = 8 bits
        (2, 1, 1, False),  # 5 + 1 + 1 = 7 bits
        (2, 1, 2, True),  # 8 bits
        (2, 2, 1, True),
    ],
)
def test_streamable_width_boundary(
    version: int, code_bits: int, gain_bits: int, streamable: bool
) -> None:
    header = BitstreamHeader("m", 16000, 320, code_bits, gain_bits, 1, version=version)
    counted = encode_file_header(replace(header, num_frames=0))
    streamed = counted[:12] + b"\xff" * 4 + counted[16:-4]
    streamed = _with_crc(streamed)
    if streamable:
        assert encode_file_header(header) == streamed
        assert decode_file_header(streamed) == (header, len(streamed))
        writer = BitstreamWriter(header)
        frames = [TokenFrame(1, 0, (0,))] * 9  # the smallest frame, 9 times
        writer.add_frames(frames)
        assert read_bitstream(writer.drain() + writer.drain(final=True)) == (header, frames)
    else:
        with pytest.raises(ValueError, match="at least 8 bits"):
            encode_file_header(header)
        error = _expect(ErrorCode.BAD_FIELD, decode_file_header, streamed)
        assert f"version-{version} frame can take 7" in error.message


# --------------------------------------------------------------------------- sequence numbers


def test_sequence_and_timestamp_wraparound() -> None:
    assert seq_add(65535, 1) == 0
    assert seq_add(0, -1) == 65535
    assert seq_diff(0, 65535) == 1
    assert seq_diff(65535, 0) == -1
    assert seq_diff(5, 5) == 0
    assert seq_diff(32767, 0) == 32767
    assert seq_diff(32768, 0) == -32768
    assert seq_lt(65535, 0) and not seq_lt(0, 65535)
    assert seq_le(3, 3) and seq_le(65000, 100)
    assert ts_diff(5, 0xFFFFFFFB) == 10
    assert ts_diff(0xFFFFFFFB, 5) == -10
    assert ts_diff(20000, 0) == 20000


# --------------------------------------------------------------------------- JSON form


def test_json_form_of_packets_and_frames() -> None:
    obj = packet_to_json(PACKET_B)
    assert obj == {
        "version": 2,
        "stream_id": 0x01020304,
        "seq": 1,
        "timestamp_us": 0xFFFFFFF0,
        "num_codebooks": 3,
        "gain_index": 63,
        "codes": [1, 2, 1000],
        "times": {
            "client_send_us": 0x11223344,
            "server_recv_us": 0x55667788,
            "server_send_us": 0x99AABBCC,
        },
    }
    text = json.dumps(obj)
    assert packet_from_json(text, **LIMITS) == PACKET_B
    assert packet_from_json(text.encode(), **LIMITS) == PACKET_B
    assert packet_from_json(json.loads(text), **LIMITS) == PACKET_B
    assert "times" not in packet_to_json(PACKET_A)
    assert "lowband" not in packet_to_json(PACKET_A)
    assert packet_from_json(packet_to_json(PACKET_A), **LIMITS) == PACKET_A
    assert frame_to_json(PACKET_A.frame) == {"num_codebooks": 1, "gain_index": 33, "codes": [1023]}
    assert frame_from_json(frame_to_json(PACKET_B.frame), **LIMITS) == PACKET_B.frame
    rng = random.Random(11)
    for _ in range(50):
        packet = _random_packet(rng)
        assert packet_from_json(json.dumps(packet_to_json(packet)), **LIMITS) == packet


def test_json_form_of_low_bands() -> None:
    assert frame_to_json(PACKET_L.frame) == {
        "num_codebooks": 2,
        "gain_index": 17,
        "codes": [5, 1000],
        "lowband": {"layout": 1, "indices": list(LOWBAND_L)},
    }
    obj = packet_to_json(PACKET_L)
    assert obj["version"] == 2 and obj["lowband"] == {"layout": 1, "indices": list(LOWBAND_L)}
    assert packet_from_json(json.dumps(obj), **LIMITS) == PACKET_L
    assert frame_from_json(json.dumps(frame_to_json(PACKET_L.frame)), **LIMITS) == PACKET_L.frame
    low2 = (M2, -M2) * (BINS2 // 2)
    frame2 = TokenFrame(1, 0, (0,), 2, low2)
    assert frame_to_json(frame2)["lowband"] == {"layout": 2, "indices": list(low2)}
    assert frame_from_json(frame_to_json(frame2), **LIMITS) == frame2


def _with_lowband(lowband: object) -> dict[str, object]:
    return {**frame_to_json(PACKET_L.frame), "lowband": lowband}


@pytest.mark.parametrize(
    ("lowband", "code"),
    [
        ({"layout": 0, "indices": []}, ErrorCode.BAD_FIELD),  # no low band: leave the key out
        ({"layout": 3, "indices": list(LOWBAND_L)}, ErrorCode.BAD_FIELD),
        ({"layout": -1, "indices": list(LOWBAND_L)}, ErrorCode.BAD_FIELD),
        ({"layout": "1", "indices": list(LOWBAND_L)}, ErrorCode.BAD_FIELD),
        ({"layout": True, "indices": list(LOWBAND_L)}, ErrorCode.BAD_FIELD),
        ({"layout": 1.0, "indices": list(LOWBAND_L)}, ErrorCode.BAD_FIELD),
        ({"layout": 1, "indices": list(LOWBAND_L[:-1])}, ErrorCode.BAD_FIELD),  # 31 indices
        ({"layout": 1, "indices": [*LOWBAND_L, 0]}, ErrorCode.BAD_FIELD),  # 33 indices
        ({"layout": 1, "indices": []}, ErrorCode.BAD_FIELD),
        ({"layout": 2, "indices": list(LOWBAND_L)}, ErrorCode.BAD_FIELD),  # layout 1's size
        ({"layout": 1, "indices": [M1 + 1] + [0] * (BINS1 - 1)}, ErrorCode.BAD_FIELD),
        ({"layout": 1, "indices": [0] * (BINS1 - 1) + [-M1 - 1]}, ErrorCode.BAD_FIELD),
        ({"layout": 2, "indices": [M2 + 1] + [0] * (BINS2 - 1)}, ErrorCode.BAD_FIELD),
        ({"layout": 1, "indices": [1.0] + [0] * 31}, ErrorCode.BAD_FIELD),
        ({"layout": 1, "indices": [False] + [0] * 31}, ErrorCode.BAD_FIELD),
        ({"layout": 1, "indices": "0,0"}, ErrorCode.BAD_FIELD),
        ({"layout": 1}, ErrorCode.BAD_FIELD),  # missing key
        ({"indices": list(LOWBAND_L)}, ErrorCode.BAD_FIELD),
        ({"layout": 1, "indices": list(LOWBAND_L), "step": 3.0}, ErrorCode.BAD_FIELD),
        (None, ErrorCode.BAD_FIELD),
        ([1, *LOWBAND_L], ErrorCode.BAD_FIELD),
        (json.dumps({"layout": 1, "indices": list(LOWBAND_L)}), ErrorCode.BAD_FIELD),  # text
    ],
)
def test_json_lowband_validation(lowband: object, code: ErrorCode) -> None:
    _expect(code, frame_from_json, _with_lowband(lowband), **LIMITS)
    packet = {**packet_to_json(PACKET_L), "lowband": lowband}
    _expect(code, packet_from_json, packet, **LIMITS)
    _expect(code, packet_from_json, json.dumps(packet), **LIMITS)


def test_json_lowband_limits_are_valid() -> None:
    for layout_id, spec in LAYOUTS.items():
        m = spec.max_index
        low = [m, -m] * (spec.bins // 2)
        frame = frame_from_json(_with_lowband({"layout": layout_id, "indices": low}), **LIMITS)
        assert frame.lowband_layout == layout_id and frame.lowband == tuple(low)


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"version": 1}, ErrorCode.UNKNOWN_VERSION),
        ({"version": 3}, ErrorCode.UNKNOWN_VERSION),
        ({"version": 2.0}, ErrorCode.BAD_FIELD),  # every value is a JSON integer
        ({"version": True}, ErrorCode.BAD_FIELD),
        ({"version": "2"}, ErrorCode.BAD_FIELD),
        ({"seq": 65536}, ErrorCode.BAD_FIELD),
        ({"seq": -1}, ErrorCode.BAD_FIELD),
        ({"seq": 1.0}, ErrorCode.BAD_FIELD),
        ({"seq": True}, ErrorCode.BAD_FIELD),
        ({"stream_id": "7"}, ErrorCode.BAD_FIELD),
        ({"timestamp_us": 1 << 32}, ErrorCode.BAD_FIELD),
        ({"num_codebooks": 0, "codes": []}, ErrorCode.BAD_FIELD),
        ({"num_codebooks": 13, "codes": [0] * 13}, ErrorCode.BAD_FIELD),
        ({"num_codebooks": 2}, ErrorCode.BAD_FIELD),  # 3 codes given
        ({"gain_index": 64}, ErrorCode.BAD_FIELD),
        ({"gain_index": -1}, ErrorCode.BAD_FIELD),
        ({"codes": [1, 2, 1024]}, ErrorCode.BAD_FIELD),
        ({"codes": "1,2,3"}, ErrorCode.BAD_FIELD),
        ({"extra": 1}, ErrorCode.BAD_FIELD),
        ({"times": {"client_send_us": 1}}, ErrorCode.BAD_FIELD),
        ({"times": "{}"}, ErrorCode.BAD_FIELD),
        ({"lowband": {"layout": 1, "indices": [0] * 31}}, ErrorCode.BAD_FIELD),
    ],
)
def test_json_validation(change: dict[str, object], code: ErrorCode) -> None:
    obj = {**packet_to_json(PACKET_B), **change}
    _expect(code, packet_from_json, obj, **LIMITS)


def test_json_structure_errors() -> None:
    obj = packet_to_json(PACKET_A)
    del obj["seq"]
    error = _expect(ErrorCode.BAD_FIELD, packet_from_json, obj, **LIMITS)
    assert "seq" in error.message
    _expect(ErrorCode.CORRUPT, packet_from_json, "{not json", **LIMITS)
    _expect(ErrorCode.CORRUPT, packet_from_json, b"\xff\xfe", **LIMITS)
    _expect(ErrorCode.BAD_FIELD, packet_from_json, "[1, 2]", **LIMITS)
    _expect(ErrorCode.BAD_FIELD, frame_from_json, {"num_codebooks": 1, "codes": [1]}, **LIMITS)
    _expect(
        ErrorCode.BAD_FIELD,
        frame_from_json,
        {"num_codebooks": 1, "gain_index": 0, "codes": [1], "seq": 3},
        **LIMITS,
    )


def test_json_version_float_is_rejected_in_text_too() -> None:
    text = json.dumps(packet_to_json(PACKET_A)).replace('"version": 2', '"version": 2.0')
    assert '"version": 2.0' in text
    error = _expect(ErrorCode.BAD_FIELD, packet_from_json, text, **LIMITS)
    assert "version must be an int" in error.message


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_json_text_with_nan_or_infinity_is_corrupt(constant: str) -> None:
    text = json.dumps(packet_to_json(PACKET_A)).replace('"seq": 65535', f'"seq": {constant}')
    assert constant in text
    error = _expect(ErrorCode.CORRUPT, packet_from_json, text, **LIMITS)
    assert constant in error.message
    _expect(ErrorCode.CORRUPT, frame_from_json, f'{{"num_codebooks": {constant}}}', **LIMITS)


def test_json_text_nested_too_deeply_is_corrupt() -> None:
    for text in ("[" * 100_000, "[" * 100_000 + "]" * 100_000, '{"a":' * 100_000):
        error = _expect(ErrorCode.CORRUPT, packet_from_json, text, **LIMITS)
        assert "nested too deeply" in error.message
        _expect(ErrorCode.CORRUPT, frame_from_json, text.encode(), **LIMITS)


def test_trusted_frames_equal_checked_frames() -> None:
    """The encoder's unchecked constructor builds the same (equal, hashable, packable) frame."""
    low = tuple([1, -2, 0, 3] * 8)
    for args in [(3, 40, (1, 2, 3)), (2, 63, (1023, 0), 1, low)]:
        trusted, checked = TokenFrame.trusted(*args), TokenFrame(*args)  # type: ignore[arg-type]
        assert trusted == checked and hash(trusted) == hash(checked)
        assert pack_frame(trusted, code_bits=10, gain_bits=6) == pack_frame(
            checked, code_bits=10, gain_bits=6)


@pytest.mark.parametrize("streamed", [False, True])
def test_read_bitstream_stops_at_max_frames(streamed: bool) -> None:
    """A file of more frames than `max_frames` is `oversized`, whether its header says so or
    the frames of a streamed file run past the limit (the reader stops there, so a small
    body of tiny frames cannot make it build millions); at the limit it reads."""
    header = BitstreamHeader("m", 16000, 320, 10, 6, 12)
    frames = [TokenFrame(1, 3, (7,))] * 6
    writer = BitstreamWriter(header)
    writer.add_frames(frames)
    data = writer.drain(final=True) if streamed else writer.getvalue()
    assert decode_file_header(data)[0].num_frames == (None if streamed else 6)
    assert read_bitstream(data, max_frames=6)[1] == frames
    with pytest.raises(ProtocolError) as info:
        read_bitstream(data, max_frames=5)
    assert info.value.code == ErrorCode.OVERSIZED and "5" in info.value.message
