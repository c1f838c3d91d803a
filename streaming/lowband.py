"""The low-band waveform layer: scalar quantisation and static Huffman coding of the lowest
MDCT bins of each frame (docs/protocol.md, "Low band").

Why: the neural decoder reproduces spectral magnitudes but not MDCT signs (phase), which caps
PESQ-WB near 1.4 even with exact magnitudes; the input's own signs below 1 kHz lift that cap to
about 3.3 (docs/model.md).  So the higher bitrate modes also send the input's lowest `bins`
MDCT coefficients as a waveform: the encoder graph outputs them divided by the frame's
quantised gain (the level-normalised *shape*, so the indices do not depend on input level),
this module quantises them with a uniform step, and the decoder graph puts the dequantised
values in place of its own prediction for those bins.

A **layout** fixes (bins, step) and the entropy code.  Indices are coded in pairs of adjacent
bins with a canonical Huffman code per pair position, built deterministically from integer
per-bin marginal counts (`streaming/lowband_tables.py`, measured on the training corpus): the
pair (a, b) gets frequency `c1[|a|] * c2[|b|] + FLOOR`.  Nothing here allocates per frame
beyond the few small arrays of one encode or decode, and nothing does I/O.

Shapes and units: `shape` values are dimensionless (MDCT coefficient / RMS gain of the frame);
`bins` counts MDCT bins of 25 Hz (N = 320 at 16 kHz), so 32 bins = 0-800 Hz.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

from streaming.lowband_tables import MARGINALS

if TYPE_CHECKING:  # pragma: no cover
    from streaming.protocol import BitReader, BitWriter

__all__ = [
    "LAYOUTS",
    "LOWBAND_LAYOUT_NONE",
    "LowbandLayout",
    "dequantize_into",
    "layout",
    "quantize",
]

LOWBAND_LAYOUT_NONE: Final = 0
"""Layout id of a frame without a low band (the decoder predicts every bin)."""

FLOOR: Final = 1 << 12
"""Added to every pair frequency (of about 2**32 in all): unseen pairs stay codable, and code
lengths stay below about 30 bits."""

_FAST_BITS: Final = 10
"""Width of the decoder's direct lookup table; longer codes take the canonical slow path."""


@dataclass(frozen=True, eq=False)
class _PairCode:
    """Canonical Huffman code of one pair position: `codes[s]`, `lengths[s]` for the pair
    symbol s = (a + M) * (2M + 1) + (b + M), plus the decoder's tables."""

    codes: tuple[int, ...]
    lengths: tuple[int, ...]
    fast: tuple[int, ...]  # [2**_FAST_BITS]: symbol << 6 | length, or -1 (longer code)
    first: tuple[int, ...]  # [maxlen + 1]: first canonical code of each length
    count: tuple[int, ...]  # [maxlen + 1]: codes of each length
    offset: tuple[int, ...]  # [maxlen + 1]: index in `ordered` of the first code of each length
    ordered: tuple[int, ...]  # symbols sorted by (length, symbol)

    @property
    def max_length(self) -> int:
        return len(self.first) - 1


@dataclass(frozen=True, eq=False)
class LowbandLayout:
    """One low-band coding layout (a format constant, identified on the wire by `layout_id`).

    * `bins`: MDCT bins sent, even (coded in pairs), from bin 0 (0 Hz) up.
    * `step`: quantiser step on the level-normalised shape.
    * `max_index` M: indices are clipped to [-M, M] (the shape's peak is at most sqrt(N)).
    * `mean_bits`: average coded bits per frame measured on the training corpus; the nominal
      bitrate of a mode adds `mean_bits * frames_per_second`.
    * `mode_codebooks`, `mode_kbps`: the bitrate mode built on this layout (policy, not
      format): `mode_codebooks` codebooks with this low band make the `mode_kbps` mode
      (e.g. 3 and 6 kbps); larger budgets add codebooks (docs/model.md).
    * `min_level_db`: the encoder sends no low band for frames whose quantised gain level is
      below this (dB re full-scale RMS of the MDCT): quiet frames gain little from it.
    """

    layout_id: int
    bins: int
    step: float
    max_index: int
    mean_bits: float
    mode_codebooks: int
    mode_kbps: float
    min_level_db: float
    marginals: tuple[tuple[int, ...], ...] = field(repr=False)

    @property
    def symbols(self) -> int:
        """Pair alphabet size, (2M + 1)**2."""
        return (2 * self.max_index + 1) ** 2

    def pair_code(self, pair: int) -> _PairCode:
        return _pair_code(self.layout_id, pair)

    def encode(self, indices: npt.NDArray[np.int64], writer: BitWriter) -> None:
        """Append the Huffman code of `indices` (int64 [bins], each in [-M, M]) to `writer`."""
        m, width = self.max_index, 2 * self.max_index + 1
        if indices.shape != (self.bins,):
            raise ValueError(f"low band needs {self.bins} indices, got shape {indices.shape}")
        if int(np.abs(indices).max(initial=0)) > m:
            raise ValueError(f"a low-band index is outside [-{m}, {m}]")
        symbols = ((indices[0::2] + m) * width + indices[1::2] + m).tolist()
        for pair, symbol in enumerate(symbols):
            code = _pair_code(self.layout_id, pair)
            writer.write(code.codes[symbol], code.lengths[symbol])

    def coded_bits(self, indices: npt.NDArray[np.int64]) -> int:
        """Bits `encode` would write for `indices` (int64 [bins])."""
        m, width = self.max_index, 2 * self.max_index + 1
        symbols = ((indices[0::2] + m) * width + indices[1::2] + m).tolist()
        return sum(_pair_code(self.layout_id, p).lengths[s] for p, s in enumerate(symbols))

    def decode(self, reader: BitReader) -> tuple[int, ...]:
        """Read `bins` indices from `reader` (ProtocolError `truncated` if the bits end)."""
        m, width = self.max_index, 2 * self.max_index + 1
        out: list[int] = []
        for pair in range(self.bins // 2):
            symbol = _read_symbol(_pair_code(self.layout_id, pair), reader)
            a, b = divmod(symbol, width)
            out += (a - m, b - m)
        return tuple(out)


def _read_symbol(code: _PairCode, reader: BitReader) -> int:
    avail = min(_FAST_BITS, reader.remaining)
    window = reader.peek(avail) << (_FAST_BITS - avail)
    entry = code.fast[window]
    if entry >= 0:
        length = entry & 63
        if length <= avail:
            reader.skip(length)
            return entry >> 6
    for length in range(_FAST_BITS + 1, code.max_length + 1):
        if not code.count[length]:
            continue
        prefix = reader.peek(length)  # raises `truncated` when the stream ends first
        delta = prefix - code.first[length]
        if 0 <= delta < code.count[length]:
            reader.skip(length)
            return code.ordered[code.offset[length] + delta]
    from streaming.protocol import ErrorCode, ProtocolError  # here: lowband is imported by protocol

    raise ProtocolError(ErrorCode.CORRUPT, "no low-band code matches", offset=reader.position >> 3)


def _huffman_lengths(freq: list[int]) -> list[int]:
    """Code length of each symbol (deterministic: ties broken by node creation order)."""
    n = len(freq)
    heap = [(f, i) for i, f in enumerate(freq)]
    heapq.heapify(heap)
    parent = [0] * (2 * n - 1)
    node = n
    while len(heap) > 1:
        f1, a = heapq.heappop(heap)
        f2, b = heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (f1 + f2, node))
        node += 1
    depth = [0] * (2 * n - 1)
    for i in range(2 * n - 3, -1, -1):  # children have smaller ids than their parents
        depth[i] = depth[parent[i]] + 1
    return depth[:n]


def _canonical(lengths: list[int]) -> _PairCode:
    ordered = sorted(range(len(lengths)), key=lambda s: (lengths[s], s))
    max_len = max(lengths)
    count = [0] * (max_len + 1)
    for length in lengths:
        count[length] += 1
    first, offset = [0] * (max_len + 1), [0] * (max_len + 1)
    code = index = 0
    for length in range(1, max_len + 1):
        code <<= 1
        first[length], offset[length] = code, index
        code += count[length]
        index += count[length]
    codes = [0] * len(lengths)
    for rank, symbol in enumerate(ordered):
        length = lengths[symbol]
        codes[symbol] = first[length] + rank - offset[length]
    fast = [-1] * (1 << _FAST_BITS)
    for symbol, (value, length) in enumerate(zip(codes, lengths, strict=True)):
        if length <= _FAST_BITS:
            start = value << (_FAST_BITS - length)
            fast[start : start + (1 << (_FAST_BITS - length))] = [symbol << 6 | length] * (
                1 << (_FAST_BITS - length)
            )
    return _PairCode(tuple(codes), tuple(lengths), tuple(fast), tuple(first), tuple(count),
                     tuple(offset), tuple(ordered))


@cache
def _pair_code(layout_id: int, pair: int) -> _PairCode:
    spec = LAYOUTS[layout_id]
    m = spec.max_index
    c1, c2 = spec.marginals[2 * pair], spec.marginals[2 * pair + 1]
    freq = [c1[abs(a)] * c2[abs(b)] + FLOOR for a in range(-m, m + 1) for b in range(-m, m + 1)]
    return _canonical(_huffman_lengths(freq))


_MODES: Final = {1: (2, 3.0, -40.0), 2: (3, 6.0, -47.0)}
"""Bitrate-mode policy (not the format), measured on data/dev (docs/model.md): layout id ->
(codebooks, nominal kbps of the mode, lowest frame level in dB that gets a low band)."""


def _layouts() -> dict[int, LowbandLayout]:
    out = {}
    for layout_id, (bins, step, mean_bits, marginals) in MARGINALS.items():
        max_index = len(marginals[0]) - 1
        if bins % 2 or len(marginals) != bins:
            raise ValueError(f"low-band layout {layout_id}: {bins} bins, {len(marginals)} tables")
        codebooks, kbps, min_level_db = _MODES[layout_id]
        out[layout_id] = LowbandLayout(layout_id, bins, step, max_index, mean_bits, codebooks,
                                       kbps, min_level_db, marginals)
    return out


LAYOUTS: Final[dict[int, LowbandLayout]] = _layouts()
"""The low-band layouts by wire id (1, 2); id 0 (`LOWBAND_LAYOUT_NONE`) means no low band."""

MAX_LOWBAND_BINS: Final = max((spec.bins for spec in LAYOUTS.values()), default=0)
"""Most bins any layout sends: the width of the graphs' `lowband` tensors must be at least this."""


def layout(layout_id: int) -> LowbandLayout:
    """The layout with wire id `layout_id` (KeyError for 0 or an unknown id)."""
    return LAYOUTS[layout_id]


def quantize(shape: npt.NDArray[np.float32], spec: LowbandLayout,
             out: npt.NDArray[np.int64],
             scratch: npt.NDArray[np.float32] | None = None) -> npt.NDArray[np.int64]:
    """Indices of the low band: `shape` float32 [..., >= bins] -> `out` int64 [..., bins].

    index = clip(rint(shape / step), -M, M) (round half to even).  `scratch`: a float32
    array of `out`'s shape to work in (none allocated then: the engine's per-frame path).
    """
    scaled = np.multiply(shape[..., : spec.bins], np.float32(1.0 / spec.step), out=scratch)
    np.rint(scaled, out=scaled)
    np.maximum(scaled, np.float32(-spec.max_index), out=scaled)  # cheaper than np.clip
    np.minimum(scaled, np.float32(spec.max_index), out=scaled)
    out[...] = scaled
    return out


def dequantize_into(indices: npt.NDArray[np.int64] | tuple[int, ...], spec: LowbandLayout,
                    values: npt.NDArray[np.float32], mask: npt.NDArray[np.float32]) -> None:
    """Decoder inputs of one frame: `values` float32 [K] = index * step on the first `bins`
    entries, 0 after; `mask` float32 [K] = 1 where a value is given, 0 after (K >= bins)."""
    bins = spec.bins
    values[:bins] = indices
    values[:bins] *= np.float32(spec.step)
    values[bins:] = 0.0
    mask[:bins] = 1.0
    mask[bins:] = 0.0


def clear_into(values: npt.NDArray[np.float32], mask: npt.NDArray[np.float32]) -> None:
    """Decoder inputs of a frame without a low band: all zeros (the decoder predicts all)."""
    values[...] = 0.0
    mask[...] = 0.0
