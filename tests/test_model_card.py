"""Model card parsing and the card/graph consistency checks (streaming/model.py).

Tampered copies of the bundled model are built in tmp_path (card.json rewritten, the ONNX
files symlinked or copied) and must fail with a ModelError that names what is wrong.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streaming.model import CodecModel, ModelCard, ModelError, default_model_dir

BUNDLED_ID = ModelCard.from_file(default_model_dir() / "card.json").model_id

DEFAULT = default_model_dir()


def default_card_json() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DEFAULT / "card.json").read_text())
    return data


def model_copy(tmp_path: Path, edit: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """The bundled model in tmp_path/model, with `edit` applied to its card.json."""
    root = tmp_path / "model"
    root.mkdir()
    card = default_card_json()
    if edit is not None:
        edit(card)
    (root / "card.json").write_text(json.dumps(card, indent=2))
    for name in ("encoder.onnx", "decoder.onnx"):
        (root / name).symlink_to(DEFAULT / name)
    return root


@pytest.fixture(scope="module")
def model() -> CodecModel:
    return CodecModel.load()


def test_default_model_loads_and_card_is_typed(model: CodecModel) -> None:
    card = model.card
    raw = default_card_json()
    assert model.path == DEFAULT
    assert card.model_id == raw["model_id"]
    assert card.frame_size == raw["frame_size"] and card.sample_rate == raw["sample_rate"]
    assert card.num_codebooks == raw["num_codebooks"]
    assert [s.name for s in card.encoder.states] == [s["name"] for s in raw["encoder"]["states"]]
    assert card.decoder.states[0].shape == tuple(raw["decoder"]["states"][0]["shape"])
    assert card.frame_ms == pytest.approx(1000 * card.frame_size / card.sample_rate)
    assert card.algorithmic_latency_ms == pytest.approx(
        card.frame_ms + 1000 * card.output_delay_samples / card.sample_rate
    )


def test_card_bitrates_follow_the_payload_formula(model: CodecModel) -> None:
    card = model.card
    for n, kbps in card.bitrates_kbps.items():
        assert card.bitrate_kbps(n) == pytest.approx(kbps)
        assert card.codebooks_for_bitrate(kbps) == n
    with pytest.raises(ValueError, match="below the lowest"):
        card.codebooks_for_bitrate(card.bitrate_kbps(1) / 2)


def test_state_objects_match_the_card(model: CodecModel) -> None:
    state = model.new_encoder_state()
    specs = model.card.encoder.states
    assert [a.shape for a in state.arrays] == [(1, *s.shape) for s in specs]
    assert state.state_nbytes == model.card.encoder.state_nbytes
    state.arrays[0].fill(1.0)
    state.swap()
    assert state.steps == 1
    state.reset()
    assert state.steps == 0 and not any(a.any() for a in (*state.arrays, *state.spare))


# ---- card validation ------------------------------------------------------------------------


def mutated(path: str, value: object) -> dict[str, Any]:
    """The default card with the field at dotted `path` set to `value` (deleted if ...)."""
    card = copy.deepcopy(default_card_json())
    *parents, leaf = path.split(".")
    node: Any = card
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is ...:
        del node[leaf]
    elif isinstance(node, list):
        node[int(leaf)] = value
    else:
        node[leaf] = value
    return card


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("format", "other-format", "format is 'other-format', expected 'codecstream-model'"),
        ("format_version", 2, "format_version is 2, this engine reads 3"),
        ("frame_size", ..., "required field 'frame_size' is missing"),
        ("frame_size", "320", "frame_size must be an integer, got '320'"),
        ("sample_rate", True, "sample_rate must be an integer, got True"),
        ("num_codebooks", 16, "num_codebooks is 16, must be 1..15"),
        ("output_delay_samples", -1, "output_delay_samples is -1, must be >= 0"),
        ("codebook_size", 1000, "codebook_size 1000 != 2**code_bits"),
        ("gain.step_db", 0, "gain.step_db must be a finite number > 0"),
        ("gain.bits", ..., "required field 'gain.bits' is missing"),
        ("model_id", "", "model_id must be a non-empty string"),
        ("encoder.file", "../x.onnx", "encoder.file must be a plain file name"),
        ("decoder.states.0.shape", [80, 0], "decoder.states[0].shape must be a list of positive"),
        ("encoder.states.1.name", "pcm_history", "encoder.states has two states named"),
        ("bitrates_kbps", {"99": 1.0}, "bitrates_kbps key '99' is not a codebook count"),
    ],
)
def test_invalid_card_fields_are_named(path: str, value: object, message: str) -> None:
    with pytest.raises(ModelError) as err:
        ModelCard.from_dict(mutated(path, value), source="card.json")
    assert str(err.value).startswith("card.json: ")
    assert message in str(err.value)


def test_card_must_be_a_json_object(tmp_path: Path) -> None:
    path = tmp_path / "card.json"
    path.write_text("[1, 2]")
    with pytest.raises(ModelError, match="the card must be a JSON object"):
        ModelCard.from_file(path)
    path.write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        ModelCard.from_file(path)


# ---- card vs graphs -------------------------------------------------------------------------


def test_untampered_copy_loads(tmp_path: Path) -> None:
    loaded = CodecModel.load(model_copy(tmp_path), threads=2)
    assert loaded.card.model_id == default_card_json()["model_id"]
    assert loaded.threads == 2


def set_(path: str, value: object) -> Callable[[dict[str, Any]], None]:
    def edit(card: dict[str, Any]) -> None:
        card.clear()
        card.update(mutated(path, value))

    return edit


def fewer_codebooks(card: dict[str, Any]) -> None:
    q = card["num_codebooks"] - 1
    card["num_codebooks"] = q
    card["bitrates_kbps"] = {k: v for k, v in card["bitrates_kbps"].items() if int(k) <= q}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (set_("frame_size", 160), "encoder.onnx: input 'pcm' has shape"),
        (fewer_codebooks, "encoder.onnx: output 'codes' has shape"),
        (set_("encoder.states.1.shape", [5, 64]), "encoder.onnx: input 'in_enc_block0' has shape"),
        (set_("decoder.states.0.name", "tail"), "missing ['in_tail']"),
        (set_("model_id", "someone-else"), f"names model '{BUNDLED_ID}' but card.json is"),
        (set_("output_delay_samples", 96), "card.json field 'output_delay_samples' is 96 but"),
        (set_("decoder.file", "missing.onnx"), "missing.onnx is missing"),
    ],
)
def test_card_graph_mismatch_raises_a_precise_model_error(
    tmp_path: Path, edit: Callable[[dict[str, Any]], None], message: str
) -> None:
    with pytest.raises(ModelError) as err:
        CodecModel.load(model_copy(tmp_path, edit))
    assert message in str(err.value)


def test_frame_size_mismatch_names_both_values(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as err:
        CodecModel.load(model_copy(tmp_path, set_("frame_size", 160)))
    text = str(err.value)
    real = default_card_json()["frame_size"]
    assert f"dimension 1 is {real} but the card says 160" in text


def test_missing_directory_and_corrupt_graph(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        CodecModel.load(tmp_path / "nope")
    root = model_copy(tmp_path)
    (root / "encoder.onnx").unlink()
    (root / "encoder.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(ModelError, match=r"encoder\.onnx: onnxruntime cannot load it"):
        CodecModel.load(root)


def test_graph_swapped_for_the_other_one(tmp_path: Path) -> None:
    root = model_copy(tmp_path)
    (root / "encoder.onnx").unlink()
    shutil.copy(DEFAULT / "decoder.onnx", root / "encoder.onnx")
    with pytest.raises(ModelError, match=r"encoder.onnx: inputs are .*missing \['pcm'"):
        CodecModel.load(root)


# ---- step argument checks -------------------------------------------------------------------


def test_steps_check_their_arrays(model: CodecModel) -> None:
    card = model.card
    state = model.new_encoder_state()
    count = np.full(1, card.num_codebooks, np.int64)
    codes = np.zeros((1, card.num_codebooks), np.int64)
    gain = np.zeros(1, np.int64)
    low = np.zeros((1, card.lowband_bins), np.float32)
    pcm = np.zeros((1, card.frame_size), np.float64)
    with pytest.raises(ValueError, match="'pcm' must be a C-contiguous float32"):
        model.encoder_step(pcm, count, state.arrays, codes, gain, low, state.spare)  # type: ignore[arg-type]
    pcm32 = np.zeros((1, card.frame_size), np.float32)
    with pytest.raises(ValueError, match="overlaps"):
        model.encoder_step(pcm32, count, state.arrays, codes, gain, low, state.arrays)
    with pytest.raises(ValueError, match="lowband"):
        model.encoder_step(pcm32, count, state.arrays, codes, gain, low[:, :8].copy(), state.spare)
    model.encoder_step(pcm32, count, state.arrays, codes, gain, low, state.spare)
    assert ((codes >= 0) & (codes < card.codebook_size)).all()
    with pytest.raises(ValueError, match="threads"):
        CodecModel.load(threads=0)


def test_in_place_steps_equal_a_plain_onnxruntime_run(model: CodecModel) -> None:
    import onnxruntime as ort

    card = model.card
    rng = np.random.default_rng(3)
    batch = 3
    pcm = (0.1 * rng.standard_normal((batch, card.frame_size))).astype(np.float32)
    enc_in = [
        rng.standard_normal((batch, *s.shape)).astype(np.float32) for s in card.encoder.states
    ]
    enc_out = [np.zeros_like(a) for a in enc_in]
    codes = np.zeros((batch, card.num_codebooks), np.int64)
    gain = np.zeros(batch, np.int64)
    low = np.zeros((batch, card.lowband_bins), np.float32)
    wanted = np.full(batch, card.num_codebooks, np.int64)
    model.encoder_step(pcm, wanted, enc_in, codes, gain, low, enc_out)
    session = ort.InferenceSession(str(model.path / card.encoder.file))
    feeds = {
        "pcm": pcm,
        "num_codebooks": wanted,
        **{s.input_name: a for s, a in zip(card.encoder.states, enc_in, strict=True)},
    }
    ref = session.run(None, feeds)
    np.testing.assert_array_equal(codes, ref[0])
    np.testing.assert_array_equal(gain, ref[1])
    np.testing.assert_array_equal(low, ref[2])
    for got, want in zip(enc_out, ref[3:], strict=True):
        np.testing.assert_array_equal(got, want)

    counts = np.array([1, card.num_codebooks, 2], np.int64)[:batch]
    masked = np.where(np.arange(card.num_codebooks) < counts[:, None], codes, 0)
    dec_in = [np.zeros((batch, *s.shape), np.float32) for s in card.decoder.states]
    dec_out = [np.zeros_like(a) for a in dec_in]
    out = np.zeros((batch, card.frame_size), np.float32)
    mask = np.zeros_like(low)
    mask[0, :32] = 1.0  # stream 0 is given a low band, the others are not
    values = np.round(low / 1.25) * 1.25 * mask
    model.decoder_step(masked, counts, gain, values, mask, dec_in, out, dec_out)
    session = ort.InferenceSession(str(model.path / card.decoder.file))
    feeds = {"codes": masked, "num_codebooks": counts, "gain_index": gain,
             "lowband": values, "lowband_mask": mask}
    feeds |= {s.input_name: a for s, a in zip(card.decoder.states, dec_in, strict=True)}
    ref = session.run(None, feeds)
    np.testing.assert_array_equal(out, ref[0])
    for got, want in zip(dec_out, ref[1:], strict=True):
        np.testing.assert_array_equal(got, want)


def _encode_once(model: CodecModel, pcm: np.ndarray, counts: np.ndarray,
                 states: list[np.ndarray]) -> np.ndarray:
    card = model.card
    batch = pcm.shape[0]
    codes = np.full((batch, card.num_codebooks), -1, np.int64)
    gain = np.zeros(batch, np.int64)
    low = np.zeros((batch, card.lowband_bins), np.float32)
    model.encoder_step(pcm, counts, states, codes, gain, low, [np.zeros_like(a) for a in states])
    return codes


def test_encoder_runs_only_the_quantizer_stages_a_batch_needs(model: CodecModel) -> None:
    """Stages past the batch's largest num_codebooks are skipped (codes 0); the codes a
    stream reads never depend on what the other streams of its batch ask for."""
    card = model.card
    rng = np.random.default_rng(5)
    batch, q = 3, card.num_codebooks
    pcm = (0.1 * rng.standard_normal((batch, card.frame_size))).astype(np.float32)
    states = [rng.standard_normal((batch, *s.shape)).astype(np.float32)
              for s in card.encoder.states]
    full = _encode_once(model, pcm, np.full(batch, q, np.int64), states)
    assert ((full >= 0) & (full < card.codebook_size)).all()
    mixed = _encode_once(model, pcm, np.array([1, 3, 2], np.int64), states)
    np.testing.assert_array_equal(mixed[:, :3], full[:, :3])
    assert (mixed[:, 3:] == 0).all()
    ones = _encode_once(model, pcm, np.ones(batch, np.int64), states)
    np.testing.assert_array_equal(ones[:, 0], full[:, 0])
    assert (ones[:, 1:] == 0).all()
