"""The exported codec model: card parsing and validation, ONNX sessions, one batched step.

A model directory holds `card.json`, `encoder.onnx` and `decoder.onnx`
(docs/model-interface.md).  `CodecModel.load` parses the card into a typed, validated
`ModelCard`, opens both graphs with onnxruntime and checks them against the card: input and
output names, dtypes and shapes, state names and shapes, frame size N, codebook count Q, a
free batch dimension, and the embedded metadata key `codecstream.card`.  Every mismatch
raises `ModelError` naming the file, the tensor and both values.

Every size (sample rate, N, Q, bit widths, state shapes) comes from the card; nothing here
assumes the default model's 16 kHz / 320 / 12 / 10 bits.

Steps run with IOBinding on caller-preallocated, C-contiguous arrays: onnxruntime reads the
inputs and writes the outputs in place, so a step allocates no numpy arrays.  Recurrent state
lives in `GraphState` objects (`EncoderState`, `DecoderState`): one float32 array
[1, *shape] per card state, double-buffered so that a step reads one set and writes the
other, then swaps.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol, TypeAlias

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from streaming.lowband import LAYOUTS, LOWBAND_LAYOUT_NONE, MAX_LOWBAND_BINS
from streaming.protocol import frame_bits

__all__ = [
    "CARD_FORMAT",
    "CARD_FORMAT_VERSION",
    "CARD_METADATA_KEY",
    "CodecModel",
    "DecoderState",
    "EncoderState",
    "GainSpec",
    "GraphSpec",
    "GraphState",
    "ModelCard",
    "ModelError",
    "PreparedStep",
    "StateHome",
    "StateSpec",
    "default_model_dir",
]

F32: TypeAlias = npt.NDArray[np.float32]
I64: TypeAlias = npt.NDArray[np.int64]

CARD_FORMAT: Final = "codecstream-model"
"""Value of the card's "format" field."""

CARD_FORMAT_VERSION: Final = 3
"""The card format version this module reads."""

CARD_METADATA_KEY: Final = "codecstream.card"
"""ONNX metadata key holding the card (JSON) the graph was exported with."""

MAX_CODEBOOKS: Final = 15
"""Most codebooks a frame payload can carry (its 4-bit count field)."""

MAX_FIELD_BITS: Final = 16
"""Largest code / gain bit width the wire formats support."""

MAX_MODEL_ID_BYTES: Final = 64
"""Longest model id (UTF-8 bytes) a bitstream file header can carry."""

# Card fields that fix the interface between the exporter and the engine: when the card
# embedded in a graph is a JSON object, these must equal card.json's.
_INTERFACE_FIELDS: Final = (
    "model_id",
    "sample_rate",
    "frame_size",
    "output_delay_samples",
    "num_codebooks",
    "codebook_size",
    "code_bits",
    "lowband_bins",
    "gain",
    "encoder",
    "decoder",
)

_ORT_FLOAT: Final = "tensor(float)"
_ORT_INT64: Final = "tensor(int64)"


class ModelError(Exception):
    """A model directory, card or graph is missing, malformed or inconsistent."""


def default_model_dir() -> Path:
    """The bundled model directory, `streaming/assets/default` (package data)."""
    return Path(__file__).resolve().parent / "assets" / "default"


# --------------------------------------------------------------------------------------------
# Card
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StateSpec:
    """One recurrent state tensor of a graph: per stream a float32 array of `shape`.

    The graph input is `in_<name>` and the output `out_<name>`, both [B, *shape].
    """

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def input_name(self) -> str:
        """Graph input of this state, `in_<name>`."""
        return f"in_{self.name}"

    @property
    def output_name(self) -> str:
        """Graph output of this state, `out_<name>`."""
        return f"out_{self.name}"

    @property
    def size(self) -> int:
        """Elements per stream."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes per stream (float32)."""
        return 4 * self.size


@dataclass(frozen=True, slots=True)
class GraphSpec:
    """A graph of the card: its file name in the model directory and its states, in order."""

    file: str
    states: tuple[StateSpec, ...]

    @property
    def state_nbytes(self) -> int:
        """Bytes of one stream's state (one copy, float32)."""
        return sum(s.nbytes for s in self.states)


@dataclass(frozen=True, slots=True)
class GainSpec:
    """Scalar gain quantiser: index i means `min_db + i * step_db` dB, i < 2**bits."""

    bits: int
    min_db: float
    step_db: float


@dataclass(frozen=True)
class BitrateMode:
    """What an encoder sends per frame: `num_codebooks` (1..Q) and `lowband_layout` (0 = none,
    else a layout of streaming/lowband.py); `kbps`: the nominal payload bitrate."""

    num_codebooks: int
    lowband_layout: int
    kbps: float


@dataclass(frozen=True)
class ModelCard:
    """Typed, validated `card.json` (docs/model-interface.md).

    Sizes: `sample_rate` in Hz, `frame_size` N and `output_delay_samples` in samples at
    `sample_rate`; `num_codebooks` Q; `code_bits`, `gain.bits` in bits.  `raw` keeps the parsed
    JSON object (read-only use) for the fields this class does not type (quality, training...).
    """

    model_id: str
    random_weights: bool
    description: str
    sample_rate: int
    frame_size: int
    output_delay_samples: int
    num_codebooks: int
    codebook_size: int
    code_bits: int
    lowband_bins: int
    gain: GainSpec
    bitrates_kbps: Mapping[int, float]
    encoder: GraphSpec
    decoder: GraphSpec
    latency_ms: Mapping[str, float]
    raw: Mapping[str, Any] = field(repr=False, compare=False)

    # ---- derived sizes --------------------------------------------------------------------

    @property
    def frame_ms(self) -> float:
        """Duration of one frame, ms (20.0 for 320 samples at 16 kHz)."""
        return 1000.0 * self.frame_size / self.sample_rate

    @property
    def frames_per_second(self) -> float:
        """Frames per second (50.0 for 320 samples at 16 kHz)."""
        return self.sample_rate / self.frame_size

    @property
    def output_delay_ms(self) -> float:
        """Decoder output delay (synthesis overlap), ms (5.0 for 80 samples at 16 kHz)."""
        return 1000.0 * self.output_delay_samples / self.sample_rate

    @property
    def algorithmic_latency_ms(self) -> float:
        """Encoder + decoder algorithmic latency: frame + output delay, ms (25.0)."""
        return self.frame_ms + self.output_delay_ms

    def frame_bits(self, num_codebooks: int) -> int:
        """Payload bits of one frame without low band: 4 (count) + gain bits + 1 (layout
        field) + `num_codebooks` * code bits (21 bits = 1.05 kbps for one codebook)."""
        return frame_bits(num_codebooks, code_bits=self.code_bits, gain_bits=self.gain.bits)

    @property
    def lowband_layouts(self) -> tuple[int, ...]:
        """Low-band layouts this model can send: 0 (none), then every layout whose bins fit
        in `lowband_bins`, ascending."""
        usable = (lid for lid, spec in sorted(LAYOUTS.items()) if spec.bins <= self.lowband_bins)
        return (LOWBAND_LAYOUT_NONE, *usable)

    def mode(self, num_codebooks: int, lowband_layout: int = LOWBAND_LAYOUT_NONE) -> BitrateMode:
        """The mode of an explicit codebook count and layout, with its nominal bitrate."""
        return BitrateMode(num_codebooks, lowband_layout,
                           self.bitrate_kbps(num_codebooks, lowband_layout))

    def bitrate_kbps(self, num_codebooks: int, lowband_layout: int = LOWBAND_LAYOUT_NONE) -> float:
        """Nominal payload bitrate in kbps of `num_codebooks` codebooks per frame, and of a
        low-band layout: then the layout's mode rate plus 0.5 kbps (10 bits a frame) per
        codebook beyond the mode's (the low band's size varies with the signal; measured
        rates are in docs/quality.md)."""
        if lowband_layout == LOWBAND_LAYOUT_NONE:
            return round(self.frame_bits(num_codebooks) * self.frames_per_second / 1000.0, 6)
        spec = LAYOUTS[lowband_layout]
        extra = (num_codebooks - spec.mode_codebooks) * self.code_bits
        return round(spec.mode_kbps + extra * self.frames_per_second / 1000.0, 6)

    def _fits(self, rate_kbps: float, budget_kbps: float) -> bool:
        """A nominal rate meets a budget within one bit per frame (0.05 kbps at 50 frames/s:
        the 1-codebook mode, 21 bits a frame, is the "1 kbps" mode)."""
        return rate_kbps <= budget_kbps + self.frames_per_second / 1000.0 + 1e-9

    def mode_for_bitrate(self, kbps: float) -> BitrateMode:
        """The bitrate mode for a budget of `kbps`: the finest low-band layout whose mode fits
        (none when none fits), with as many codebooks as fit (at least the layout mode's).
        ValueError when even one codebook without low band does not fit.

        On the default card: 1 kbps -> 1 codebook; 3 kbps -> 2 codebooks + layout 1;
        6 kbps -> 3 codebooks + layout 2; 7 kbps -> 5 codebooks + layout 2.
        """
        finest_first = (*reversed(self.lowband_layouts[1:]), LOWBAND_LAYOUT_NONE)
        for layout_id in finest_first:
            low = LAYOUTS[layout_id].mode_codebooks if layout_id else 1
            fits = [n for n in range(low, self.num_codebooks + 1)
                    if self._fits(self.bitrate_kbps(n, layout_id), kbps)]
            if fits:
                return self.mode(max(fits), layout_id)
        raise ValueError(f"{kbps} kbps is below the lowest bitrate {self.bitrate_kbps(1)} kbps")

    def codebooks_for_bitrate(self, kbps: float) -> int:
        """Most codebooks without low band whose bitrate fits `kbps` (ValueError if none)."""
        fits = [n for n in range(1, self.num_codebooks + 1)
                if self._fits(self.bitrate_kbps(n), kbps)]
        if not fits:
            raise ValueError(f"{kbps} kbps is below the lowest bitrate {self.bitrate_kbps(1)} kbps")
        return max(fits)

    # ---- parsing --------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: Path) -> ModelCard:
        """Read and validate a card.json file; ModelError on any problem."""
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ModelError(f"{path}: cannot read the model card ({exc.strerror})") from None
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ModelError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: object, *, source: str = "card.json") -> ModelCard:
        """Validate a parsed card; ModelError naming `source` and the field on any problem."""
        p = _CardParser(source)
        obj = p.mapping(data, "the card")
        fmt = obj.get("format")
        if fmt != CARD_FORMAT:
            raise ModelError(f"{source}: format is {fmt!r}, expected {CARD_FORMAT!r}")
        version = obj.get("format_version")
        if version != CARD_FORMAT_VERSION or type(version) is not int:
            raise ModelError(
                f"{source}: format_version is {version!r}, this engine reads {CARD_FORMAT_VERSION}"
            )
        model_id = p.string(obj, "model_id")
        if len(model_id.encode("utf-8")) > MAX_MODEL_ID_BYTES:
            raise ModelError(
                f"{source}: model_id {model_id!r} is longer than {MAX_MODEL_ID_BYTES} bytes"
            )
        sample_rate = p.integer(obj, "sample_rate", 1)
        frame_size = p.integer(obj, "frame_size", 1)
        output_delay = p.integer(obj, "output_delay_samples", 0)
        q = p.integer(obj, "num_codebooks", 1, MAX_CODEBOOKS)
        code_bits = p.integer(obj, "code_bits", 1, MAX_FIELD_BITS)
        codebook_size = p.integer(obj, "codebook_size", 2)
        if codebook_size != 1 << code_bits:
            raise ModelError(
                f"{source}: codebook_size {codebook_size} != 2**code_bits = {1 << code_bits}"
            )
        lowband_bins = p.integer(obj, "lowband_bins", MAX_LOWBAND_BINS, frame_size)
        gain_obj = p.mapping(p.required(obj, "gain"), "gain")
        gain = GainSpec(
            p.integer(gain_obj, "bits", 1, MAX_FIELD_BITS, where="gain"),
            p.number(gain_obj, "min_db", where="gain"),
            p.number(gain_obj, "step_db", where="gain", positive=True),
        )
        bitrates = p.bitrates(obj.get("bitrates_kbps"), q)
        latency = p.numbers(obj.get("latency_ms"), "latency_ms")
        random_weights = obj.get("random_weights", False)
        if type(random_weights) is not bool:
            raise ModelError(f"{source}: random_weights must be true or false")
        description = obj.get("description", "")
        if not isinstance(description, str):
            raise ModelError(f"{source}: description must be a string")
        return cls(
            model_id=model_id,
            random_weights=random_weights,
            description=description,
            sample_rate=sample_rate,
            frame_size=frame_size,
            output_delay_samples=output_delay,
            num_codebooks=q,
            codebook_size=codebook_size,
            code_bits=code_bits,
            lowband_bins=lowband_bins,
            gain=gain,
            bitrates_kbps=bitrates,
            encoder=p.graph(obj, "encoder"),
            decoder=p.graph(obj, "decoder"),
            latency_ms=latency,
            raw=obj,
        )


class _CardParser:
    """Field readers raising ModelError("<source>: <field> ...")."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, message: str) -> ModelError:
        return ModelError(f"{self.source}: {message}")

    def mapping(self, value: object, what: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(f"{what} must be a JSON object, got {type(value).__name__}")
        return value

    def required(self, obj: Mapping[str, Any], key: str, where: str = "") -> object:
        if key not in obj:
            name = f"{where}.{key}" if where else key
            raise self.fail(f"required field {name!r} is missing")
        return obj[key]

    def string(self, obj: Mapping[str, Any], key: str) -> str:
        value = self.required(obj, key)
        if not isinstance(value, str) or not value:
            raise self.fail(f"{key} must be a non-empty string, got {value!r}")
        return value

    def integer(
        self,
        obj: Mapping[str, Any],
        key: str,
        lo: int,
        hi: int | None = None,
        *,
        where: str = "",
    ) -> int:
        value = self.required(obj, key, where)
        name = f"{where}.{key}" if where else key
        if type(value) is not int:
            raise self.fail(f"{name} must be an integer, got {value!r}")
        if value < lo or (hi is not None and value > hi):
            span = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise self.fail(f"{name} is {value}, must be {span}")
        return value

    def number(
        self, obj: Mapping[str, Any], key: str, *, where: str = "", positive: bool = False
    ) -> float:
        value = self.required(obj, key, where)
        name = f"{where}.{key}" if where else key
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(f"{name} must be a number, got {value!r}")
        number = float(value)
        if not math.isfinite(number) or (positive and number <= 0):
            raise self.fail(
                f"{name} must be a finite number{' > 0' if positive else ''}, got {value!r}"
            )
        return number

    def numbers(self, value: object, key: str) -> dict[str, float]:
        if value is None:
            return {}
        obj = self.mapping(value, key)
        return {k: self.number(obj, k, where=key) for k in obj}

    def bitrates(self, value: object, q: int) -> dict[int, float]:
        if value is None:
            return {}
        obj = self.mapping(value, "bitrates_kbps")
        out: dict[int, float] = {}
        for key in obj:
            if not key.isdigit() or not 1 <= int(key) <= q:
                raise self.fail(f"bitrates_kbps key {key!r} is not a codebook count in 1..{q}")
            out[int(key)] = self.number(obj, key, where="bitrates_kbps", positive=True)
        return dict(sorted(out.items()))

    def graph(self, obj: Mapping[str, Any], key: str) -> GraphSpec:
        g = self.mapping(self.required(obj, key), key)
        file = g.get("file")
        if not isinstance(file, str) or not file or "/" in file or "\\" in file:
            raise self.fail(f"{key}.file must be a plain file name, got {file!r}")
        raw_states = self.required(g, "states", key)
        if not isinstance(raw_states, list):
            raise self.fail(f"{key}.states must be a list")
        states: list[StateSpec] = []
        for i, raw in enumerate(raw_states):
            where = f"{key}.states[{i}]"
            s = self.mapping(raw, where)
            name = s.get("name")
            if not isinstance(name, str) or not name.isidentifier():
                raise self.fail(f"{where}.name must be an identifier, got {name!r}")
            shape = s.get("shape")
            if (
                not isinstance(shape, list)
                or not shape
                or not all(type(d) is int and d > 0 for d in shape)
            ):
                raise self.fail(f"{where}.shape must be a list of positive ints, got {shape!r}")
            dtype = s.get("dtype", "float32")
            if dtype != "float32":
                raise self.fail(f"{where}.dtype is {dtype!r}; only 'float32' is supported")
            if any(st.name == name for st in states):
                raise self.fail(f"{key}.states has two states named {name!r}")
            states.append(StateSpec(name, tuple(shape), dtype))
        return GraphSpec(file, tuple(states))


# --------------------------------------------------------------------------------------------
# Recurrent state
# --------------------------------------------------------------------------------------------


class StateHome(Protocol):
    """Where a `GraphState` lives while a batch engine holds it (see `GraphState.settle`)."""

    def release(self, state: GraphState) -> None:
        """Copy `state`'s current value back into its own buffers and let it go."""


class GraphState:
    """Recurrent ONNX state of ONE stream for one graph.

    For each `StateSpec` of the card a float32 array [1, *shape] (the leading 1 is the batch
    dimension, so the arrays bind directly to a B=1 step), double-buffered: `arrays` is the
    current state, `spare` the buffer the next step writes; `swap()` exchanges them.  Each
    buffer set is one contiguous row of `flat` ([2, total] float32, the arrays are views in
    card order).  All memory is allocated once; `reset()` zeroes it (the initial state of
    every stream is all zeros).  `steps` counts the frames processed since creation or the
    last reset.

    Between batched steps a `BatchEngine` keeps the state in a row of its own batch tensors
    (`home`), so that consecutive steps need no copies in and out; while it does, these
    buffers are stale.  Every access here first calls `settle()`, which has the engine copy
    the current value back (one copy) and let the state go, so a stream can be stepped
    alone, reset or inspected at any time.  The state of a stream held by an engine of
    another thread must not be touched (engines and their streams are single-threaded).
    """

    __slots__ = ("_cur", "_flat", "_parity", "_spare", "home", "row", "specs", "steps")

    def __init__(self, specs: Sequence[StateSpec]) -> None:
        self.specs: tuple[StateSpec, ...] = tuple(specs)
        total = sum(math.prod(s.shape) for s in self.specs)
        self._flat: F32 = np.zeros((2, total), dtype=np.float32)
        self._cur = _views(self._flat[0], self.specs)
        self._spare = _views(self._flat[1], self.specs)
        self.steps = 0
        self._parity = 0
        self.home: StateHome | None = None
        """The batch engine slots holding the current value, or None (it is here)."""
        self.row = -1
        """The row of `home` (meaningful only while `home` is set)."""

    def settle(self) -> None:
        """Bring the current value home from the batch engine holding it (no-op if none)."""
        if self.home is not None:
            self.home.release(self)

    @property
    def flat(self) -> F32:
        """Both buffer sets, [2, total]; row `parity` is the current state."""
        self.settle()
        return self._flat

    @property
    def parity(self) -> int:
        """Which of the two buffer sets is current (row of `flat`); flips on swap."""
        self.settle()
        return self._parity

    @property
    def arrays(self) -> tuple[F32, ...]:
        """Current state arrays, [1, *shape] each, in card order."""
        self.settle()
        return self._cur

    @property
    def spare(self) -> tuple[F32, ...]:
        """The other buffer set, written by the next unbatched step."""
        self.settle()
        return self._spare

    def current_views(self) -> tuple[F32, ...]:
        """The current buffer set's arrays WITHOUT settling (for the engine holding it)."""
        return self._cur

    def swap(self) -> None:
        """Make `spare` current (after a step wrote it) and count the step."""
        self.settle()
        self._cur, self._spare = self._spare, self._cur
        self._parity ^= 1
        self.steps += 1

    def get(self, name: str) -> F32:
        """Current value of state `name`, shape `spec.shape` (a view)."""
        for spec, arr in zip(self.specs, self.arrays, strict=True):
            if spec.name == name:
                view: F32 = arr[0]
                return view
        raise KeyError(name)

    def reset(self) -> None:
        """Back to the initial (all-zero) state."""
        self.settle()
        self._flat.fill(0.0)
        self.steps = 0

    @property
    def state_nbytes(self) -> int:
        """Bytes of one copy of the state (what a stream's recurrent state weighs)."""
        return int(self._flat[0].nbytes)

    @property
    def nbytes(self) -> int:
        """Bytes allocated (both buffers)."""
        return int(self._flat.nbytes)


def _views(row: F32, specs: Sequence[StateSpec]) -> tuple[F32, ...]:
    """Per-state views [1, *shape] of one flat state vector, in card order."""
    views: list[F32] = []
    offset = 0
    for spec in specs:
        size = math.prod(spec.shape)
        views.append(row[offset : offset + size].reshape(1, *spec.shape))
        offset += size
    return tuple(views)


class EncoderState(GraphState):
    """`GraphState` of an encoder stream (card.encoder.states)."""

    __slots__ = ()


class DecoderState(GraphState):
    """`GraphState` of a decoder stream (card.decoder.states)."""

    __slots__ = ()


# --------------------------------------------------------------------------------------------
# Graphs
# --------------------------------------------------------------------------------------------


_NP_FOR_ORT: Final[dict[str, type[np.generic]]] = {_ORT_FLOAT: np.float32, _ORT_INT64: np.int64}


@dataclass(frozen=True, slots=True)
class _Tensor:
    """Expected graph tensor: name, ORT type, per-stream shape (batch dim excluded)."""

    name: str
    ort_type: str
    shape: tuple[int, ...]


class _Graph:
    """An onnxruntime session bound by pointer to caller arrays in a fixed tensor order."""

    def __init__(
        self,
        path: Path,
        options: ort.SessionOptions,
        inputs: Sequence[_Tensor],
        outputs: Sequence[_Tensor],
    ) -> None:
        self.path = path
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped exceptions
            raise ModelError(f"{path.name}: onnxruntime cannot load it: {exc}") from None

    def check(self) -> None:
        """Compare the session's declared inputs/outputs with the expected ones."""
        self._check_side("input", self.session.get_inputs(), self.inputs)
        self._check_side("output", self.session.get_outputs(), self.outputs)

    def _check_side(self, side: str, actual: Sequence[Any], expected: Sequence[_Tensor]) -> None:
        name = self.path.name
        got = {a.name: a for a in actual}
        want = [t.name for t in expected]
        missing = [n for n in want if n not in got]
        extra = [n for n in got if n not in want]
        if missing or extra:
            raise ModelError(
                f"{name}: {side}s are {sorted(got)}; the card requires {sorted(want)} "
                f"(missing {missing}, unexpected {extra})"
            )
        for t in expected:
            a = got[t.name]
            if a.type != t.ort_type:
                raise ModelError(
                    f"{name}: {side} {t.name!r} has type {a.type}, expected {t.ort_type}"
                )
            shape = list(a.shape)
            if len(shape) != 1 + len(t.shape):
                raise ModelError(
                    f"{name}: {side} {t.name!r} has shape {shape}, the card implies "
                    f"[batch, {', '.join(map(str, t.shape))}]".replace(", ]", "]")
                )
            if isinstance(shape[0], int) and shape[0] >= 0:
                raise ModelError(
                    f"{name}: {side} {t.name!r} has a fixed batch dimension {shape[0]}; "
                    "the batch dimension must be dynamic"
                )
            for axis, (dim, exp) in enumerate(zip(shape[1:], t.shape, strict=True), 1):
                if isinstance(dim, int) and dim != exp:
                    raise ModelError(
                        f"{name}: {side} {t.name!r} has shape {shape}, dimension {axis} "
                        f"is {dim} but the card says {exp} (expected [batch, "
                        f"{', '.join(map(str, t.shape))}])"
                    )

    def probe(self, batch: int) -> None:
        """Run once on zeros and check the actual output shapes (catches symbolic dims)."""
        feeds = {
            t.name: np.zeros((batch, *t.shape), dtype=_NP_FOR_ORT[t.ort_type]) for t in self.inputs
        }
        for t in self.inputs:
            if t.name == "num_codebooks":
                feeds[t.name].fill(1)
        try:
            results = self.session.run([t.name for t in self.outputs], feeds)
        except Exception as exc:
            raise ModelError(f"{self.path.name}: a test step on zeros failed: {exc}") from None
        for t, value in zip(self.outputs, results, strict=True):
            if tuple(value.shape) != (batch, *t.shape):
                raise ModelError(
                    f"{self.path.name}: output {t.name!r} has shape {list(value.shape)} for a "
                    f"batch of {batch}, the card implies {[batch, *t.shape]}"
                )

    def metadata_card(self) -> str | None:
        meta = self.session.get_modelmeta().custom_metadata_map
        value = meta.get(CARD_METADATA_KEY)
        return value if isinstance(value, str) else None

    def bind(self, inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> ort.IOBinding:
        """An IOBinding of `inputs` / `outputs` (in the order of `self.inputs` /
        `self.outputs`) by pointer: C-contiguous arrays of the tensor's dtype and shape
        [B, *shape] (same B for all); outputs are written in place, none overlapping an
        input.  The binding stays valid while the arrays live."""
        binding = self.session.io_binding()
        for t, arr in zip(self.inputs, inputs, strict=True):
            binding.bind_input(t.name, "cpu", 0, arr.dtype, arr.shape, arr.ctypes.data)
        for t, arr in zip(self.outputs, outputs, strict=True):
            binding.bind_output(t.name, "cpu", 0, arr.dtype, arr.shape, arr.ctypes.data)
        return binding

    def run(self, inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> None:
        """One step on arrays bound for this call only (see `bind`)."""
        self.session.run_with_iobinding(self.bind(inputs, outputs))


class PreparedStep:
    """One graph step bound once to fixed arrays: every `run()` reuses the same onnxruntime
    IOBinding, so a step costs no binding work (about 20 tensors per call otherwise).

    Holds references to its arrays (the binding points into them); the owner changes their
    contents between runs.  Build with `CodecModel.prepare_encoder_step` /
    `prepare_decoder_step`, which check the arrays once.
    """

    __slots__ = ("_arrays", "_binding", "_session")

    def __init__(
        self, graph: _Graph, inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray]
    ) -> None:
        self._arrays = (tuple(inputs), tuple(outputs))
        self._binding = graph.bind(inputs, outputs)
        self._session = graph.session

    def run(self) -> None:
        """Run the step: read the bound inputs, write the bound outputs in place."""
        self._session.run_with_iobinding(self._binding)


def _check_arrays(
    what: str, specs: Sequence[_Tensor], arrays: Sequence[np.ndarray], batch: int
) -> None:
    if len(arrays) != len(specs):
        raise ValueError(f"{what}: expected {len(specs)} arrays, got {len(arrays)}")
    for t, arr in zip(specs, arrays, strict=True):
        if (
            arr.dtype != _NP_FOR_ORT[t.ort_type]
            or arr.shape != (batch, *t.shape)
            or not arr.flags.c_contiguous
        ):
            raise ValueError(
                f"{what}: {t.name!r} must be a C-contiguous {_NP_FOR_ORT[t.ort_type].__name__} "
                f"array of shape {(batch, *t.shape)}, got {arr.dtype} {arr.shape}"
            )


def _check_step(
    what: str, graph: _Graph, inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray]
) -> None:
    """Dtypes, shapes [B, *shape] (B from the first input), contiguity, no overlap."""
    batch = inputs[0].shape[0]
    _check_arrays(f"{what} inputs", graph.inputs, inputs, batch)
    _check_arrays(f"{what} outputs", graph.outputs, outputs, batch)
    _check_no_overlap(inputs, outputs)


def _check_no_overlap(inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> None:
    for out in outputs:
        for arr in inputs:
            if np.may_share_memory(out, arr):
                raise ValueError("a step's output array overlaps one of its inputs")


class CodecModel:
    """A loaded, validated model: `card`, the encoder and decoder sessions, batched steps.

    Thread-safety: onnxruntime sessions may run concurrently, but each step's arrays must
    belong to one caller at a time.
    """

    def __init__(
        self, path: Path, card: ModelCard, encoder: _Graph, decoder: _Graph, threads: int
    ) -> None:
        self.path = path
        self.card = card
        self.threads = threads
        self._encoder = encoder
        self._decoder = decoder

    @classmethod
    def load(
        cls, path: Path | None = None, threads: int = 1, *, inter_op_threads: int = 1
    ) -> CodecModel:
        """Load and check the model directory `path` (default: `default_model_dir()`).

        `threads` is onnxruntime's intra-op thread count, `inter_op_threads` its inter-op one
        (both 1 by default: one core per session, scale with processes or batching).  With
        several intra-op threads the pool's threads block instead of spinning between
        operators: a frame step is hundreds of small operators, and spinning workers burned
        3x the CPU for a slower step (40 streams: 13.9 ms on one thread; 20.7 ms wall,
        41 ms CPU spinning on two; 9.0 ms wall, 12.7 ms CPU blocking on two).
        Raises ModelError when a file is missing or unreadable, the card is invalid, or the
        graphs do not match the card.
        """
        if threads < 1 or inter_op_threads < 1:
            raise ValueError("threads and inter_op_threads must be >= 1")
        root = default_model_dir() if path is None else Path(path)
        if not root.is_dir():
            raise ModelError(f"model directory {root} does not exist")
        card = ModelCard.from_file(root / "card.json")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = inter_op_threads
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        if threads > 1 or inter_op_threads > 1:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        graphs: list[_Graph] = []
        for spec, (ins, outs) in (
            (card.encoder, _encoder_tensors(card)),
            (card.decoder, _decoder_tensors(card)),
        ):
            file = root / spec.file
            if not file.is_file():
                raise ModelError(f"model directory {root}: {spec.file} is missing")
            graphs.append(_Graph(file, options, ins, outs))
        encoder, decoder = graphs
        for graph in graphs:
            graph.check()
            graph.probe(batch=2)
        for graph in graphs:
            _check_metadata(graph, card)
        return cls(root, card, encoder, decoder, threads)

    # ---- states ---------------------------------------------------------------------------

    def new_encoder_state(self) -> EncoderState:
        """A fresh (all-zero) encoder state for one stream."""
        return EncoderState(self.card.encoder.states)

    def new_decoder_state(self) -> DecoderState:
        """A fresh (all-zero) decoder state for one stream."""
        return DecoderState(self.card.decoder.states)

    # ---- steps ----------------------------------------------------------------------------

    def encoder_step(
        self,
        pcm: F32,
        num_codebooks: I64,
        states_in: Sequence[F32],
        codes: I64,
        gain_index: I64,
        lowband: F32,
        states_out: Sequence[F32],
        *,
        check: bool = True,
    ) -> None:
        """One encoder step for B streams, in place.

        * `pcm`: float32 [B, N], the next N model-rate samples of each stream, in [-1, 1].
        * `num_codebooks`: int64 [B], each 1..Q: the codebooks each stream will read.  The
          graph skips the quantizer stages no stream of the batch needs (their codes are
          written as 0); a stream's first codes do not depend on what the others ask for.
        * `states_in`, `states_out`: float32 [B, *shape] per `card.encoder.states`, in order;
          outputs must not overlap inputs (use two buffers and swap).
        * `codes`: int64 [B, Q], written: the RVQ indices (at least the first `num_codebooks`
          of each stream are real).
        * `gain_index`: int64 [B], written.
        * `lowband`: float32 [B, K], written: the first K = `card.lowband_bins` MDCT bins
          divided by the frame's quantised gain (what a low-band layout quantises).

        `check=False` skips the dtype / shape / contiguity / overlap checks (for callers whose
        buffers are built to fit, like the streams and the batch engine); wrong arrays then
        corrupt memory.
        """
        inputs, outputs = _encoder_io(pcm, num_codebooks, states_in, codes, gain_index, lowband,
                                      states_out)
        if check:
            _check_step("encoder_step", self._encoder, inputs, outputs)
        self._encoder.run(inputs, outputs)

    def decoder_step(
        self,
        codes: I64,
        num_codebooks: I64,
        gain_index: I64,
        lowband: F32,
        lowband_mask: F32,
        states_in: Sequence[F32],
        pcm: F32,
        states_out: Sequence[F32],
        *,
        check: bool = True,
    ) -> None:
        """One decoder step for B streams, in place.

        * `codes`: int64 [B, Q]; entries at or beyond a stream's count must be 0.
        * `num_codebooks`: int64 [B], each 1..Q.
        * `gain_index`: int64 [B], each in [0, 2**gain.bits).
        * `lowband`, `lowband_mask`: float32 [B, K]: sent low-band values (index * step) and
          1 where a value is sent, 0 elsewhere (all zeros: no low band).
        * `states_in`, `states_out`: float32 [B, *shape] per `card.decoder.states`.
        * `pcm`: float32 [B, N], written: N model-rate samples per stream, delayed by
          `card.output_delay_samples` relative to the encoder input.

        `check`: as for `encoder_step`.
        """
        inputs, outputs = _decoder_io(
            codes, num_codebooks, gain_index, lowband, lowband_mask, states_in, pcm, states_out
        )
        if check:
            _check_step("decoder_step", self._decoder, inputs, outputs)
        self._decoder.run(inputs, outputs)

    def prepare_encoder_step(
        self,
        pcm: F32,
        num_codebooks: I64,
        states_in: Sequence[F32],
        codes: I64,
        gain_index: I64,
        lowband: F32,
        states_out: Sequence[F32],
    ) -> PreparedStep:
        """`encoder_step` on these arrays, checked and bound once: `.run()` repeats it."""
        inputs, outputs = _encoder_io(pcm, num_codebooks, states_in, codes, gain_index, lowband,
                                      states_out)
        _check_step("encoder step", self._encoder, inputs, outputs)
        return PreparedStep(self._encoder, inputs, outputs)

    def prepare_decoder_step(
        self,
        codes: I64,
        num_codebooks: I64,
        gain_index: I64,
        lowband: F32,
        lowband_mask: F32,
        states_in: Sequence[F32],
        pcm: F32,
        states_out: Sequence[F32],
    ) -> PreparedStep:
        """`decoder_step` on these arrays, checked and bound once: `.run()` repeats it."""
        inputs, outputs = _decoder_io(
            codes, num_codebooks, gain_index, lowband, lowband_mask, states_in, pcm, states_out
        )
        _check_step("decoder step", self._decoder, inputs, outputs)
        return PreparedStep(self._decoder, inputs, outputs)

    def __repr__(self) -> str:
        return f"CodecModel({self.card.model_id!r}, path={str(self.path)!r})"


_Arrays: TypeAlias = list[npt.NDArray[Any]]


def _encoder_io(pcm: F32, num_codebooks: I64, states_in: Sequence[F32], codes: I64,
                gain_index: I64, lowband: F32,
                states_out: Sequence[F32]) -> tuple[_Arrays, _Arrays]:
    """The encoder step's arrays in graph order (see `_encoder_tensors`)."""
    return [pcm, num_codebooks, *states_in], [codes, gain_index, lowband, *states_out]


def _decoder_io(codes: I64, num_codebooks: I64, gain_index: I64, lowband: F32,
                lowband_mask: F32, states_in: Sequence[F32], pcm: F32,
                states_out: Sequence[F32]) -> tuple[_Arrays, _Arrays]:
    """The decoder step's arrays in graph order (see `_decoder_tensors`)."""
    return [codes, num_codebooks, gain_index, lowband, lowband_mask, *states_in], [pcm, *states_out]


def _encoder_tensors(card: ModelCard) -> tuple[list[_Tensor], list[_Tensor]]:
    states = card.encoder.states
    inputs = [_Tensor("pcm", _ORT_FLOAT, (card.frame_size,)),
              _Tensor("num_codebooks", _ORT_INT64, ())]
    inputs += [_Tensor(s.input_name, _ORT_FLOAT, s.shape) for s in states]
    outputs = [
        _Tensor("codes", _ORT_INT64, (card.num_codebooks,)),
        _Tensor("gain_index", _ORT_INT64, ()),
        _Tensor("lowband", _ORT_FLOAT, (card.lowband_bins,)),
    ]
    outputs += [_Tensor(s.output_name, _ORT_FLOAT, s.shape) for s in states]
    return inputs, outputs


def _decoder_tensors(card: ModelCard) -> tuple[list[_Tensor], list[_Tensor]]:
    states = card.decoder.states
    inputs = [
        _Tensor("codes", _ORT_INT64, (card.num_codebooks,)),
        _Tensor("num_codebooks", _ORT_INT64, ()),
        _Tensor("gain_index", _ORT_INT64, ()),
        _Tensor("lowband", _ORT_FLOAT, (card.lowband_bins,)),
        _Tensor("lowband_mask", _ORT_FLOAT, (card.lowband_bins,)),
    ]
    inputs += [_Tensor(s.input_name, _ORT_FLOAT, s.shape) for s in states]
    outputs = [_Tensor("pcm", _ORT_FLOAT, (card.frame_size,))]
    outputs += [_Tensor(s.output_name, _ORT_FLOAT, s.shape) for s in states]
    return inputs, outputs


def _check_metadata(graph: _Graph, card: ModelCard) -> None:
    """The graph's embedded card must name card.json's model (and agree on the interface)."""
    name = graph.path.name
    text = graph.metadata_card()
    if text is None:
        raise ModelError(f"{name}: ONNX metadata key {CARD_METADATA_KEY!r} is missing")
    try:
        embedded: object = json.loads(text)
    except ValueError:
        embedded = text  # a bare model id
    embedded_id = embedded.get("model_id") if isinstance(embedded, Mapping) else embedded
    if embedded_id != card.model_id:
        raise ModelError(
            f"{name}: metadata {CARD_METADATA_KEY!r} names model {embedded_id!r} but card.json "
            f"is for {card.model_id!r}"
        )
    if isinstance(embedded, Mapping):
        for key in _INTERFACE_FIELDS:
            if key not in embedded:
                continue
            diff = _first_difference(card.raw.get(key), embedded[key], key)
            if diff is not None:
                where, ours, theirs = diff
                raise ModelError(
                    f"{name}: card.json field {where!r} is {ours!r} but the graph was exported "
                    f"with {theirs!r}"
                )


def _first_difference(a: object, b: object, path: str) -> tuple[str, object, object] | None:
    """(dotted path, a's value, b's value) of the first place two JSON values differ."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in sorted(set(a) | set(b)):
            diff = _first_difference(a.get(key), b.get(key), f"{path}.{key}")
            if diff is not None:
                return diff
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            diff = _first_difference(x, y, f"{path}[{i}]")
            if diff is not None:
                return diff
        return None
    return None if a == b else (path, a, b)
