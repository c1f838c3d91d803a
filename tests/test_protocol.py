"""Wire and file formats (streaming/protocol.py, docs/protocol.md).

The fixed byte vectors below are the format: if one of them changes, the format changed and
PROTOCOL_VERSION / FILE_FORMAT_VERSION must be bumped (and docs/protocol.md updated).
"""

from __future__ import annotations

import json
import pickle
import random
import struct
import zlib
from dataclasses import replace

import numpy as np
import pytest

from streaming.protocol import (
    EXT_TAG_SOURCE,
    FILE_FORMAT_VERSION,
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

# --------------------------------------------------------------------------- fixed vectors

PACKET_A = TokenPacket(stream_id=7, seq=65535, timestamp_us=20000, frame=TokenFrame(1, 33, (1023,)))
PACKET_A_BYTES = bytes.fromhex(
    "c5 01 01 00"  # magic, version 1, type 1 (frame), flags 0
    "00 00 00 07"  # stream id 7
    "ff ff"  # seq 65535
    "00 00 4e 20"  # timestamp 20000 µs
    "18 7f f0"  # 0001 100001 1111111111 0000: n=1, gain=33, code 1023, 4 pad bits
)

PACKET_B = TokenPacket(
    stream_id=0x01020304,
    seq=1,
    timestamp_us=0xFFFFFFF0,
    frame=TokenFrame(3, 63, (1, 2, 1000)),
    times=PacketTimes(0x11223344, 0x55667788, 0x99AABBCC),
)
PACKET_B_BYTES = bytes.fromhex(
    "c5 01 01 01"  # flags: bit 0 = times block present
    "01 02 03 04"
    "00 01"
    "ff ff ff f0"
    "11 22 33 44 55 66 77 88 99 aa bb cc"  # client send, server recv, server send (µs)
    "3f c0 10 0b e8"  # 0011 111111 0000000001 0000000010 1111101000 (40 bits, no pad)
)

FILE_HEADER = BitstreamHeader("cs-test", 16000, 320, CODE_BITS, GAIN_BITS, Q, num_frames=2)
FILE_FRAMES = [TokenFrame(1, 33, (1023,)), TokenFrame(2, 0, (0, 5))]
FILE_BYTES = bytes.fromhex(
    "43 53 54 52"  # "CSTR"
    "01 00"  # format version 1, flags 0
    "00 21"  # header length 33
    "00 00 3e 80"  # sample rate 16000
    "00 00 00 02"  # 2 frames
    "01 40"  # frame size 320
    "0a 06 0c"  # code bits 10, gain bits 6, Q 12
    "07 63 73 2d 74 65 73 74"  # model id "cs-test"
    "87 f2 dd bb"  # CRC32 of bytes 0..28
    "18 7f f2 00 00 01 40"  # 20 + 30 bits of frames, 6 zero bits of padding
)
STREAMED_FILE_BYTES = bytes.fromhex(
    "43 53 54 52 01 00 00 21 00 00 3e 80"
    "ff ff ff ff"  # frame count unknown
    "01 40 0a 06 0c 07 63 73 2d 74 65 73 74"
    "50 8c 17 54"
    "18 7f f2 00 00 01 40"
)

# the same file with the source extension record (tag 1): the original audio was 2.5 s at
# 44.1 kHz; byte for byte what `codec-client encode` has always written
SOURCE = SourceInfo(rate=44100, samples=110250)
SOURCE_FILE_HEADER = BitstreamHeader(
    "cs-test", 16000, 320, CODE_BITS, GAIN_BITS, Q, num_frames=2, source=SOURCE
)
SOURCE_FILE_BYTES = bytes.fromhex(
    "43 53 54 52 01 00"
    "00 2b"  # header length 43 = 33 + a 10-byte extension area
    "00 00 3e 80 00 00 00 02 01 40 0a 06 0c 07 63 73 2d 74 65 73 74"
    "01 08"  # extension record: tag 1 (source), value of 8 bytes
    "00 00 ac 44"  # source sample rate 44100
    "00 01 ae aa"  # source samples 110250
    "cb 08 17 40"  # CRC32 of bytes 0..38
    "18 7f f2 00 00 01 40"
)
STREAMED_SOURCE_FILE_BYTES = bytes.fromhex(
    "43 53 54 52 01 00 00 2b 00 00 3e 80"
    "ff ff ff ff"
    "01 40 0a 06 0c 07 63 73 2d 74 65 73 74"
    "01 08 00 00 ac 44 00 01 ae aa"
    "f7 b6 76 03"
    "18 7f f2 00 00 01 40"
)


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
    fixed = struct.pack(
        ">4sBBHIIHBBBB", b"CSTR", 1, flags, length, rate, frames, fsize, cbits, gbits, q, id_len
    )
    return fixed + model_id


# --------------------------------------------------------------------------- reference packer


def _ref_bits(frame: TokenFrame, code_bits: int = CODE_BITS, gain_bits: int = GAIN_BITS) -> str:
    """Independent reference: the frame payload as a '0'/'1' string."""
    out = format(frame.num_codebooks, "04b") + format(frame.gain_index, f"0{gain_bits}b")
    return out + "".join(format(c, f"0{code_bits}b") for c in frame.codes)


def _bits_to_bytes(bits: str) -> bytes:
    bits += "0" * (-len(bits) % 8)
    return bytes(int(bits[i : i + 8], 2) for i in range(0, len(bits), 8))


def _random_frame(
    rng: random.Random, q: int = Q, code_bits: int = CODE_BITS, gain_bits: int = GAIN_BITS
) -> TokenFrame:
    n = rng.randint(1, q)
    codes = tuple(rng.randrange(1 << code_bits) for _ in range(n))
    return TokenFrame(n, rng.randrange(1 << gain_bits), codes)


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
    assert PROTOCOL_VERSION == 1
    assert FILE_FORMAT_VERSION == 1


def test_packet_vectors_encode_exactly() -> None:
    assert encode_packet(PACKET_A, **BITS) == PACKET_A_BYTES
    assert encode_packet(PACKET_B, **BITS) == PACKET_B_BYTES
    assert len(PACKET_A_BYTES) == 17
    assert len(PACKET_B_BYTES) == 31


def test_packet_vectors_decode_exactly() -> None:
    assert _decode(PACKET_A_BYTES) == PACKET_A
    assert _decode(PACKET_B_BYTES) == PACKET_B
    decoded = _decode(PACKET_B_BYTES)
    assert (decoded.num_codebooks, decoded.gain_index, decoded.codes) == (3, 63, (1, 2, 1000))
    # any bytes-like input
    assert _decode(bytearray(PACKET_B_BYTES)) == PACKET_B
    assert _decode(memoryview(PACKET_B_BYTES)) == PACKET_B


def test_file_vector_writes_and_reads_exactly() -> None:
    writer = BitstreamWriter(FILE_HEADER)
    writer.add_frames(FILE_FRAMES)
    assert writer.getvalue() == FILE_BYTES
    assert writer.finalize() == FILE_BYTES
    assert writer.closed
    # the CRC field is the plain CRC-32 (zlib / IEEE 802.3) of the bytes before it
    assert FILE_BYTES[29:33] == struct.pack(">I", zlib.crc32(FILE_BYTES[:29]))
    header, frames = read_bitstream(FILE_BYTES)
    assert header == FILE_HEADER
    assert frames == FILE_FRAMES


def test_file_vector_with_source_record() -> None:
    assert write_bitstream(SOURCE_FILE_HEADER, FILE_FRAMES) == SOURCE_FILE_BYTES
    assert SOURCE_FILE_BYTES[39:43] == struct.pack(">I", zlib.crc32(SOURCE_FILE_BYTES[:39]))
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
    writer.add(FILE_FRAMES[1])
    chunks.append(writer.drain())
    chunks.append(writer.drain(final=True))
    assert b"".join(chunks) == STREAMED_FILE_BYTES
    assert len(chunks[0]) == 33  # header alone first
    header, frames = read_bitstream(STREAMED_FILE_BYTES)
    assert header.num_frames is None
    assert frames == FILE_FRAMES
    with pytest.raises(ValueError, match="closed"):
        writer.add(FILE_FRAMES[0])


def test_file_size_measures_the_bitrate() -> None:
    # 50 frames of 1 codebook = 50 × 20 bits = 1000 bits: 1.0 kbps for one second
    writer = BitstreamWriter(FILE_HEADER)
    writer.add_frames([TokenFrame(1, 5, (7,))] * 50)
    data = writer.finalize()
    assert len(data) - 33 == 125
    assert writer.payload_bits == 1000
    assert [frame_bits(n, **BITS) for n in (1, 5, 11, 12)] == [20, 60, 120, 130]
    assert payload_size(12, **BITS) == 17
    assert max_packet_size(max_codebooks=Q, **BITS) == 14 + 12 + 17


def test_frame_payload_vectors() -> None:
    assert pack_frame(TokenFrame(1, 33, (1023,)), **BITS) == bytes.fromhex("187ff0")
    full = TokenFrame(12, 1, tuple(range(12)))
    assert pack_frame(full, **BITS) == _bits_to_bytes(_ref_bits(full))
    assert len(pack_frame(full, **BITS)) == 17
    assert unpack_frame(bytes.fromhex("187ff0"), **LIMITS) == TokenFrame(1, 33, (1023,))


# --------------------------------------------------------------------------- round trips


def test_random_packet_round_trips() -> None:
    rng = random.Random(1234)
    for _ in range(300):
        packet = _random_packet(rng)
        data = encode_packet(packet, **BITS)
        header = 14 + (12 if packet.times else 0)
        assert data[header:] == _bits_to_bytes(_ref_bits(packet.frame))
        assert _decode(data) == packet


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


def test_random_file_round_trips_with_streaming_drains() -> None:
    rng = random.Random(7)
    for trial in range(20):
        frames = [_random_frame(rng) for _ in range(rng.randint(0, 60))]
        header = BitstreamHeader("m" * trial, 16000, 320, CODE_BITS, GAIN_BITS, Q)
        writer = BitstreamWriter(header)
        chunks = []
        for frame in frames:
            writer.add(frame)
            if rng.random() < 0.3:
                chunks.append(writer.drain())
        complete = writer.getvalue()
        chunks.append(writer.drain(final=True))
        streamed = b"".join(chunks)
        payload = _bits_to_bytes("".join(_ref_bits(f) for f in frames))
        assert complete.endswith(payload) and streamed.endswith(payload)
        assert len(complete) == len(streamed) == 26 + trial + len(payload)
        for data, count in ((complete, len(frames)), (streamed, None)):
            got_header, got = read_bitstream(data)
            assert got == frames
            assert got_header.num_frames == count
            assert got_header.model_id == "m" * trial


def test_frame_stream_vectorised_matches_reference() -> None:
    rng = random.Random(5)
    frames = [_random_frame(rng) for _ in range(200)]
    expected = _bits_to_bytes("".join(_ref_bits(f) for f in frames))
    arrays = FrameArrays.from_frames(frames, Q)
    assert pack_frame_stream(arrays, **BITS) == expected
    assert pack_frame_stream(frames, **BITS) == expected
    assert pack_frame_stream([], **BITS) == b""
    back = unpack_frame_stream(expected, count=200, **LIMITS)
    assert back.codes.shape == (200, Q) and back.codes.dtype == np.int64
    assert back.frames() == frames
    np.testing.assert_array_equal(back.codes, arrays.codes)
    np.testing.assert_array_equal(back.gain_index, arrays.gain_index)
    assert unpack_frame_stream(expected, **LIMITS).frames() == frames  # count unknown


def test_read_bitstream_arrays_feed_the_decoder_layout() -> None:
    header, arrays = read_bitstream_arrays(FILE_BYTES)
    assert header.frame_rate == 50.0 and header.frame_ms == 20.0
    np.testing.assert_array_equal(arrays.num_codebooks, [1, 2])
    np.testing.assert_array_equal(arrays.gain_index, [33, 0])
    expected = np.zeros((2, Q), dtype=np.int64)
    expected[0, 0], expected[1, 1] = 1023, 5
    np.testing.assert_array_equal(arrays.codes, expected)
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
    np.testing.assert_array_equal(frame.codes_array(Q), [0, 3, 6, 9, 12] + [0] * 7)
    assert TokenFrame(2, 0, [4, 5]) == TokenFrame(2, 0, (4, 5))  # type: ignore[arg-type]
    for bad in [(0, 0, ()), (16, 0, (0,) * 16), (2, 0, (1,)), (1, -1, (0,)), (1, 0, (-1,))]:
        with pytest.raises(ValueError):
            TokenFrame(*bad)
    with pytest.raises(ValueError):
        TokenFrame.from_codes([1, 2], 0, 3)


def test_encoding_rejects_values_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="gain_index 64"):
        pack_frame(TokenFrame(1, 64, (0,)), **BITS)
    with pytest.raises(ValueError, match="code 1024"):
        encode_packet(TokenPacket(0, 0, 0, TokenFrame(1, 0, (1024,))), **BITS)
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


# --------------------------------------------------------------------------- malformed packets


@pytest.mark.parametrize("vector", [PACKET_A_BYTES, PACKET_B_BYTES])
def test_packet_truncated_at_every_offset(vector: bytes) -> None:
    for cut in range(len(vector)):
        error = _expect(ErrorCode.TRUNCATED, _decode, vector[:cut])
        assert error.offset is not None


def test_packet_bad_magic_version_type_flags() -> None:
    data = bytearray(PACKET_A_BYTES)
    for value in (0x00, 0xC4, 0xFF, ord("{")):
        data[0] = value
        _expect(ErrorCode.BAD_MAGIC, _decode, bytes(data))
    _expect(ErrorCode.BAD_MAGIC, _decode, b"\x00")
    data = bytearray(PACKET_A_BYTES)
    for value in (0, 2, 255):
        data[1] = value
        error = _expect(ErrorCode.UNKNOWN_VERSION, _decode, bytes(data))
        assert error.offset == 1
    # a future version is reported as such even when only two bytes arrived
    _expect(ErrorCode.UNKNOWN_VERSION, _decode, b"\xc5\x02")
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
    _expect(ErrorCode.OVERSIZED, _decode, PACKET_A_BYTES + bytes(limit))
    _expect(ErrorCode.OVERSIZED, _decode, b"x" * (limit + 1))  # checked before the magic
    _expect(ErrorCode.OVERSIZED, _decode, PACKET_A_BYTES, max_bytes=16)
    assert _decode(PACKET_A_BYTES, max_bytes=17) == PACKET_A
    biggest = TokenPacket(1, 1, 1, TokenFrame(12, 63, (1023,) * 12), PacketTimes(1, 2, 3))
    assert len(encode_packet(biggest, **BITS)) == limit
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


def test_packet_trailing_data_and_padding() -> None:
    error = _expect(ErrorCode.TRAILING_DATA, _decode, PACKET_A_BYTES + b"\x00")
    assert error.offset == 17
    _expect(ErrorCode.TRAILING_DATA, _decode, PACKET_B_BYTES + b"\x00\x00")
    for pad in (0x01, 0x08, 0x0F):  # the 4 low bits of the last byte are padding
        data = PACKET_A_BYTES[:-1] + bytes([0xF0 | pad])
        _expect(ErrorCode.CORRUPT, _decode, data)


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
    for version in (0, 2, 255):
        data = FILE_BYTES[:4] + bytes([version]) + FILE_BYTES[5:]
        _expect(ErrorCode.UNKNOWN_VERSION, read_bitstream, data)


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
    _expect(ErrorCode.CORRUPT, read_bitstream, FILE_BYTES[:-1] + b"\x41")  # padding bit set
    # frame 0 claims 0 codebooks
    _expect(ErrorCode.BAD_FIELD, read_bitstream, header + b"\x08\x7f\xf2\x00\x00\x01\x40")
    # frame 1 claims 13 codebooks (> Q = 12): its count starts at bit 20 = byte 2, low nibble
    data = bytearray(FILE_BYTES)
    data[35] = (data[35] & 0xF0) | 13
    _expect(ErrorCode.BAD_FIELD, read_bitstream, bytes(data))
    # streamed files: a stray full byte after the last frame cannot be a frame
    _expect(ErrorCode.BAD_FIELD, read_bitstream, STREAMED_FILE_BYTES + b"\x00")
    empty = BitstreamWriter(FILE_HEADER)
    assert read_bitstream(empty.finalize()) == (
        BitstreamHeader("cs-test", 16000, 320, 10, 6, 12, num_frames=0),
        [],
    )
    _expect(ErrorCode.TRUNCATED, read_bitstream, FILE_BYTES[:33])  # header says 2 frames


def test_header_encode_decode_round_trip() -> None:
    for header in [
        FILE_HEADER,
        BitstreamHeader("", 8000, 160, 1, 1, 1, None),
        BitstreamHeader("ü" * 32, 48000, 960, 16, 16, 15, UNKNOWN_FRAME_COUNT - 1),
        SOURCE_FILE_HEADER,
        BitstreamHeader("m" * 64, 8000, 160, 1, 1, 1, None, SourceInfo(0xFFFFFFFF, 0)),
    ]:
        data = encode_file_header(header)
        assert decode_file_header(data) == (header, len(data))


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
        "version": 1,
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
    assert packet_from_json(packet_to_json(PACKET_A), **LIMITS) == PACKET_A
    assert frame_to_json(PACKET_A.frame) == {"num_codebooks": 1, "gain_index": 33, "codes": [1023]}
    assert frame_from_json(frame_to_json(PACKET_B.frame), **LIMITS) == PACKET_B.frame
    rng = random.Random(11)
    for _ in range(50):
        packet = _random_packet(rng)
        assert packet_from_json(json.dumps(packet_to_json(packet)), **LIMITS) == packet


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"version": 2}, ErrorCode.UNKNOWN_VERSION),
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
