"""BatchEngine (streaming/batch.py): one ONNX call for many streams == each stream alone.

Tokens must be identical. PCM and float states are compared to float32 rounding: onnxruntime
may pick a different matrix-multiply kernel for a batch of B rows than for one row, which can
change the last bit of a sum."""

from __future__ import annotations

import numpy as np
import pytest

from streaming.batch import BatchEngine
from streaming.framing import SampleFormat
from streaming.model import CodecModel
from streaming.protocol import TokenFrame
from streaming.stream import DecoderStream, EncoderStream


class FakeClock:
    def __init__(self, step: float = 0.001) -> None:
        self.t = 0.0
        self.step = step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


@pytest.fixture(scope="module")
def model() -> CodecModel:
    return CodecModel.load()


def noise(rate: int, seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    x = 0.3 * np.sin(2 * np.pi * (150 + 50 * seed) * t) + 0.05 * rng.standard_normal(len(t))
    return (x * 32767).astype(np.int16)


# (rate, num_codebooks, seconds): different rates, bitrates and lengths per stream
SETUPS = [(16000, 12, 0.5), (48000, 1, 0.4), (8000, 5, 0.3), (24000, 7, 0.5), (16000, 3, 0.0),
          (48000, 11, 0.2)]  # fmt: skip


def make_encoders(model: CodecModel) -> tuple[list[EncoderStream], list[np.ndarray]]:
    q = model.card.num_codebooks
    streams = [EncoderStream(model, rate=r, num_codebooks=min(n, q)) for r, n, _ in SETUPS]
    audio = [noise(r, s, i) for i, (r, _, s) in enumerate(SETUPS)]
    return streams, audio


def test_batched_encoding_equals_unbatched(model: CodecModel) -> None:
    alone, audio = make_encoders(model)
    expected = [s.encode(x) for s, x in zip(alone, audio, strict=True)]
    batched, _ = make_encoders(model)
    engine = BatchEngine(model, capacity=2)  # too small: must grow
    for s, x in zip(batched, audio, strict=True):
        s.push(x)
    got = engine.encode_all(batched)
    assert got == expected
    assert engine.capacity >= len(SETUPS) - 1 and engine.grows >= 1
    for a, b in zip(alone, batched, strict=True):
        assert a.frames_encoded == b.frames_encoded
        for x, y in zip(a.state.arrays, b.state.arrays, strict=True):
            assert_same_floats(x, y, model)


def assert_same_floats(x: np.ndarray, y: np.ndarray, model: CodecModel) -> None:
    """Bit for bit with int8 graphs (the shipped default: the 8-bit kernels compute each row
    on its own, and the graphs' own sums run in the same order for every batch size,
    docs/model.md); to float32 rounding with fp16/fp32 storage, whose float32 GEMM picks its
    kernel by the number of rows.  The codes above are identical either way."""
    if model.card.raw.get("weights") == "int8":
        np.testing.assert_array_equal(x, y)
    else:
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_encode_step_returns_none_for_streams_with_nothing_due(model: CodecModel) -> None:
    streams, audio = make_encoders(model)
    for s, x in zip(streams, audio, strict=True):
        s.push(x)
    clock = FakeClock()
    engine = BatchEngine(model, clock=clock)
    out = engine.encode_step(streams)
    due = [bool(len(x)) for x in audio]
    assert [f is not None for f in out] == due
    records = [s.last_latency for s, d in zip(streams, due, strict=True) if d]
    assert all(r is not None and r.batch_size == sum(due) for r in records)
    assert len({(r.start, r.end) for r in records if r is not None}) == 1  # one shared step
    assert engine.encode_batches == 1


def test_bitrate_change_mid_stream_under_batching(model: CodecModel) -> None:
    q = model.card.num_codebooks
    x = noise(16000, 0.4, 3)
    ref = EncoderStream(model).encode(x)
    a, b = EncoderStream(model), EncoderStream(model, num_codebooks=1)
    a.push(x)
    b.push(x)
    engine = BatchEngine(model)
    got_a, got_b = [], []
    i = 0
    while a.pending_frames:
        a.set_num_codebooks(i % q + 1)
        fa, fb = engine.encode_step([a, b])
        assert fa is not None and fb is not None
        got_a.append(fa)
        got_b.append(fb)
        i += 1
    assert [f.codes for f in got_a] == [r.codes[: i % q + 1] for i, r in enumerate(ref)]
    assert [f.codes for f in got_b] == [r.codes[:1] for r in ref]


def frames_for(model: CodecModel, seed: int, n_codebooks: int) -> list[TokenFrame]:
    frames = EncoderStream(model, num_codebooks=n_codebooks).encode(noise(16000, 0.4, seed))
    return frames


def test_batched_decoding_equals_unbatched(model: CodecModel) -> None:
    q = model.card.num_codebooks
    specs = [(16000, 1), (48000, q), (8000, 5), (24000, 2), (16000, 7)]
    inputs = [frames_for(model, i, min(n, q)) for i, (_, n) in enumerate(specs)]
    inputs[2] = inputs[2][:7]  # streams of different lengths

    def streams() -> list[DecoderStream]:
        out = [DecoderStream(model, rate=r, fmt=SampleFormat.F32LE) for r, _ in specs]
        for s, frames in zip(out, inputs, strict=True):
            s.push_many(frames[:3])
            s.push_silence()
            s.push_many(frames[3:])
        return out

    alone = streams()
    for s in alone:
        s.run()
    batched = streams()
    engine = BatchEngine(model, capacity=1)
    consumed = engine.decode_all(batched)
    assert consumed == sum(len(f) + 1 for f in inputs)
    assert engine.decode_batches < consumed
    for a, b in zip(alone, batched, strict=True):
        assert a.frames_decoded == b.frames_decoded
        assert_same_floats(b.pull(), a.pull(), model)
        for x, y in zip(a.state.arrays, b.state.arrays, strict=True):
            assert_same_floats(x, y, model)


def test_streams_can_move_between_alone_and_batched_steps(model: CodecModel) -> None:
    x = noise(16000, 0.4, 9)
    ref = EncoderStream(model).encode(x)
    s, other = EncoderStream(model), EncoderStream(model)
    s.push(x)
    other.push(x)
    engine = BatchEngine(model)
    got: list[TokenFrame] = []
    while s.pending_frames:
        frame = s.step() if len(got) % 2 else engine.encode_step([other, s])[1]
        assert frame is not None
        got.append(frame)
    assert got == ref


def test_a_stream_listed_twice_is_rejected(model: CodecModel) -> None:
    s = EncoderStream(model)
    s.push(noise(16000, 0.1, 0))
    engine = BatchEngine(model)
    with pytest.raises(ValueError, match="twice"):
        engine.encode_step([s, s])
    d = DecoderStream(model)
    with pytest.raises(ValueError, match="twice"):
        engine.decode_step([d, d])
    assert engine.encode_step([s])[0] is not None  # a later step with it alone is fine


def test_engine_with_no_due_stream_makes_no_call(model: CodecModel) -> None:
    engine = BatchEngine(model)
    assert engine.encode_step([EncoderStream(model)]) == [None]
    assert engine.decode_step([DecoderStream(model)]) == [False]
    assert engine.encode_batches == engine.decode_batches == 0


def encoded_alone(model: CodecModel, audio: list[np.ndarray]) -> list[list[TokenFrame]]:
    return [EncoderStream(model).encode(x) for x in audio]


def test_states_stay_in_the_engine_between_steps_and_come_home_on_access(
    model: CodecModel,
) -> None:
    audio = [noise(16000, 0.2, i) for i in range(3)]
    streams = [EncoderStream(model) for _ in audio]
    for s, x in zip(streams, audio, strict=True):
        s.push(x)
    engine = BatchEngine(model)
    engine.encode_step(streams)
    assert engine.resident == (3, 0)
    assert all(s.state.home is not None for s in streams[1:])
    reference = EncoderStream(model)
    reference.push(audio[0])
    reference.step()
    for x, y in zip(streams[0].state.arrays, reference.state.arrays, strict=True):
        assert_same_floats(x, y, model)  # read through the engine's rows, brought home
    assert engine.resident == (2, 0) and streams[0].state.home is None
    assert streams[0].state.steps == reference.state.steps == 1
    engine.settle()
    assert engine.resident == (0, 0)


def test_full_batches_and_subsets_in_any_order_equal_streams_alone(model: CodecModel) -> None:
    """Steps over every held stream run in place; steps over a subset, or in another order,
    or with a stream arriving (the engine grows) go through the scratch rows."""
    audio = [noise(16000, 0.4, i) for i in range(4)]
    expected = encoded_alone(model, audio)
    streams = [EncoderStream(model) for _ in audio]
    for s, x in zip(streams, audio, strict=True):
        s.push(x)
    engine = BatchEngine(model, capacity=2)
    got: list[list[TokenFrame]] = [[] for _ in streams]
    plans = [[0, 1, 2], [2, 0, 1], [1], [0, 2], [3, 1, 0, 2], [0, 1, 2, 3], [3, 2]]
    while any(s.pending_frames for s in streams):
        for plan in plans:
            listed = [streams[i] for i in plan]
            for i, frame in zip(plan, engine.encode_step(listed), strict=True):
                if frame is not None:
                    got[i].append(frame)
    assert got == expected
    assert engine.grows >= 1


def test_states_idle_for_a_while_are_handed_back(model: CodecModel) -> None:
    from streaming.batch import IDLE_STEPS

    quiet, busy = EncoderStream(model), EncoderStream(model)
    x = noise(16000, 0.1, 1)
    quiet.push(x)
    frame = noise(16000, 0.02, 2)
    engine = BatchEngine(model)

    def step_busy(times: int) -> None:
        for _ in range(times):
            busy.push(frame)
            assert engine.encode_step([busy])[0] is not None

    busy.push(frame)
    engine.encode_step([quiet, busy])
    assert engine.resident == (2, 0)
    step_busy(IDLE_STEPS - 1)
    assert engine.resident == (2, 0)  # not idle long enough yet
    step_busy(IDLE_STEPS // 4 + 1)
    assert engine.resident == (1, 0) and quiet.state.home is None
    assert quiet.pull() == encoded_alone(model, [x])[0][1:]


def test_a_stream_can_move_between_engines_and_be_reset(model: CodecModel) -> None:
    x = noise(16000, 0.3, 4)
    expected = encoded_alone(model, [x])[0]
    s = EncoderStream(model)
    s.push(x)
    first, second = BatchEngine(model), BatchEngine(model)
    got = []
    while s.pending_frames:
        engine = first if len(got) % 2 else second
        frame = engine.encode_step([s])[0]
        assert frame is not None
        got.append(frame)
        assert engine.resident == (1, 0)
    assert got == expected
    assert first.resident[0] + second.resident[0] == 1
    s.reset()
    assert first.resident == second.resident == (0, 0)
    assert all(not a.any() for a in s.state.arrays) and s.state.steps == 0


def test_intra_op_threads_change_no_output(model: CodecModel) -> None:
    """The server gives an engine process 2 onnxruntime threads on a 2-core machine
    (server.settings.auto_engine_threads): its tokens and PCM must be those of 1 thread."""
    threaded = CodecModel.load(model.path, threads=2)
    outputs = []
    for m in (model, threaded):
        encoders = [EncoderStream(m, rate=r, num_codebooks=min(n, m.card.num_codebooks))
                    for r, n, _ in SETUPS]
        audio = [noise(r, max(s, 0.3), i) for i, (r, _, s) in enumerate(SETUPS)]
        for s, x in zip(encoders, audio, strict=True):
            s.push(x)
        frames = BatchEngine(m).encode_all(encoders)
        decoders = [DecoderStream(m, fmt=SampleFormat.F32LE) for _ in frames]
        for s, stream_frames in zip(decoders, frames, strict=True):
            s.push_many(stream_frames)
        BatchEngine(m).decode_all(decoders)
        outputs.append((frames, [s.pull() for s in decoders]))
    (frames_1, pcm_1), (frames_2, pcm_2) = outputs
    assert frames_1 == frames_2 and all(len(f) > 0 for f in frames_1)
    for x, y in zip(pcm_1, pcm_2, strict=True):
        assert x.size > 0
        assert_same_floats(x, y, model)
