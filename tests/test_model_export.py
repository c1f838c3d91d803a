"""ONNX export: frame-by-frame onnxruntime output equals the PyTorch full-sequence forward,
states are explicit named inputs/outputs, and the card (file and metadata) matches the graphs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from models.codec import CodecConfig
from models.export import METADATA_KEY, export_model, random_model
from models.measure import OnnxCodec
from tests.test_model_codec import TINY, speechlike

N, L = TINY.frame_size, TINY.overlap
SHIPPED = Path(__file__).resolve().parents[1] / "streaming" / "assets" / "default"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module, dict]:
    out = tmp_path_factory.mktemp("model")
    model = random_model(TINY, seed=3)
    card = export_model(out, model=model, model_id="test-tiny")
    return out, model, card


def test_onnx_frame_by_frame_equals_pytorch_full_sequence(exported) -> None:
    out, model, _ = exported
    pcm = speechlike(15, batch=3)
    codes, gains = model.encode(pcm)
    onnx_codec = OnnxCodec(out)
    onnx_codes, onnx_gains = onnx_codec.encode(pcm.numpy())
    np.testing.assert_array_equal(onnx_codes, codes.numpy())
    np.testing.assert_array_equal(onnx_gains, gains.numpy())
    for count in (1, 4, TINY.num_codebooks):
        offline = model.decode(codes, gains, count).numpy()
        streamed = onnx_codec.decode(codes.numpy(), gains.numpy(), count)
        np.testing.assert_allclose(streamed[:, L:], offline[:, :-L], atol=1e-4)


def test_onnx_low_band_equals_pytorch(exported) -> None:
    out, model, _ = exported
    pcm = speechlike(12, batch=2)
    onnx_codec = OnnxCodec(out)
    codes, gains = onnx_codec.encode(pcm.numpy())
    with torch.no_grad():
        states = model.initial_state("encoder", 2)
        shape_low = model.encoder_core(pcm, states)[6]
    np.testing.assert_allclose(onnx_codec.lowband, shape_low.numpy(), atol=1e-5)
    mask = np.zeros_like(onnx_codec.lowband)
    mask[0, :, :12] = 1.0  # stream 0 sends 12 bins, stream 1 none
    values = np.round(onnx_codec.lowband / 0.5) * 0.5 * mask
    streamed = onnx_codec.decode(codes, gains, 3, (values, mask))
    with torch.no_grad():
        quantized = model.quantizer.decode(torch.from_numpy(codes), torch.full((2,), 3))
        offline, _ = model.decode_latents(quantized, model.gain_value(torch.from_numpy(gains)),
                                          lowband=(torch.from_numpy(values),
                                                   torch.from_numpy(mask)))
    np.testing.assert_allclose(streamed[:, L:], offline.numpy()[:, :-L], atol=1e-4)
    plain = onnx_codec.decode(codes, gains, 3)
    np.testing.assert_allclose(streamed[1], plain[1], atol=1e-6)
    assert not np.allclose(streamed[0], plain[0], atol=1e-3)


def test_states_are_named_inputs_and_outputs(exported) -> None:
    out, _, card = exported
    for part in ("encoder", "decoder"):
        graph = onnx.load(str(out / f"{part}.onnx")).graph
        inputs = {i.name for i in graph.input}
        outputs = {o.name for o in graph.output}
        for state in card[part]["states"]:
            assert f"in_{state['name']}" in inputs
            assert f"out_{state['name']}" in outputs


def _check_card_matches_graphs(folder: Path) -> dict:
    card = json.loads((folder / "card.json").read_text())
    assert card["format"] == "codecstream-model" and card["format_version"] == 3
    for part in ("encoder", "decoder"):
        graph = onnx.load(str(folder / card[part]["file"]))
        meta = {p.key: p.value for p in graph.metadata_props}
        assert json.loads(meta[METADATA_KEY]) == card
        dims = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim][1:]
                for i in graph.graph.input}
        for state in card[part]["states"]:
            assert dims[f"in_{state['name']}"] == state["shape"]
    dec_inputs = {i.name: i for i in onnx.load(str(folder / "decoder.onnx")).graph.input}
    enc_outputs = {o.name: o for o in onnx.load(str(folder / "encoder.onnx")).graph.output}
    for tensor in (dec_inputs["lowband"], dec_inputs["lowband_mask"], enc_outputs["lowband"]):
        assert [d.dim_value for d in tensor.type.tensor_type.shape.dim][1:] == [
            card["lowband_bins"]]
    enc_inputs = {i.name: i for i in onnx.load(str(folder / "encoder.onnx")).graph.input}
    frame = [d.dim_value for d in enc_inputs["pcm"].type.tensor_type.shape.dim][1]
    assert frame == card["frame_size"]
    return card


def test_exported_card_matches_its_graphs(exported) -> None:
    out, _, card = exported
    assert _check_card_matches_graphs(out) == card
    assert card["random_weights"] is True
    assert card["latency_ms"]["algorithmic"] == 25.0


def test_shipped_model_loads_and_its_card_matches_its_graphs() -> None:
    card = _check_card_matches_graphs(SHIPPED)
    codec = OnnxCodec(SHIPPED)
    pcm = speechlike(6).numpy()
    codes, gains = codec.encode(pcm)
    assert codes.shape == (2, 6, card["num_codebooks"])
    decoded = codec.decode(codes, gains, 1)
    assert decoded.shape == pcm.shape and np.isfinite(decoded).all()


def test_bitrates_follow_the_frame_payload() -> None:
    card = json.loads((SHIPPED / "card.json").read_text())
    rates = card["bitrates_kbps"]
    frames_per_s = card["sample_rate"] / card["frame_size"]
    for count, kbps in rates.items():
        bits = 4 + card["gain"]["bits"] + 1 + card["code_bits"] * int(count)  # 1: no low band
        assert kbps == pytest.approx(bits * frames_per_s / 1000)
    assert CodecConfig().num_codebooks >= 11


def test_fp16_storage_halves_the_file_and_keeps_exact_parity(tmp_path: Path) -> None:
    model = random_model(TINY, seed=4)
    export_model(tmp_path / "fp32", model=model, model_id="t32")
    export_model(tmp_path / "fp16", model=model, model_id="t16", weights="fp16")  # rounds `model`
    size32 = (tmp_path / "fp32" / "decoder.onnx").stat().st_size
    size16 = (tmp_path / "fp16" / "decoder.onnx").stat().st_size
    assert size16 < size32
    graph = onnx.load(str(tmp_path / "fp16" / "decoder.onnx")).graph
    large_fp32 = [tuple(i.dims) for i in graph.initializer
                  if i.data_type == onnx.TensorProto.FLOAT and np.prod(i.dims) >= 1024]
    assert set(large_fp32) <= {(N, N + L), (N + L, N)}  # only the MDCT basis stays float32
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.initializer)
    pcm = speechlike(8)
    codes, gains = model.encode(pcm)
    onnx_codec = OnnxCodec(tmp_path / "fp16")
    onnx_codes, _ = onnx_codec.encode(pcm.numpy())
    np.testing.assert_array_equal(onnx_codes, codes.numpy())
    offline = model.decode(codes, gains, 3).numpy()
    streamed = onnx_codec.decode(codes.numpy(), gains.numpy(), 3)
    np.testing.assert_allclose(streamed[:, L:], offline[:, :-L], atol=1e-4)


def test_int8_export_quantizes_the_blocks_linear_layers_and_stays_close(tmp_path: Path) -> None:
    model = random_model(TINY, seed=5)
    card = export_model(tmp_path, model=model, model_id="t8", weights="int8")  # rounds `model`
    assert card["weights"] == "int8"
    block_layers = 2 * (TINY.encoder_blocks + TINY.decoder_blocks)  # up and down
    quantized = 0
    for name in ("encoder.onnx", "decoder.onnx"):
        graph = onnx.load(str(tmp_path / name)).graph
        quantized += sum(node.op_type == "MatMulIntegerToFloat" for node in graph.node)
        int8 = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
        assert len(int8) == sum(node.op_type == "MatMulIntegerToFloat" for node in graph.node)
        # the input and output layers, codebook distances and MDCT bases stay float MatMuls
        assert sum(node.op_type == "MatMul" for node in graph.node) >= 2
    assert quantized == block_layers
    pcm = speechlike(10, batch=2)
    codes, gains = model.encode(pcm)
    onnx_codec = OnnxCodec(tmp_path)
    onnx_codes, onnx_gains = onnx_codec.encode(pcm.numpy())
    np.testing.assert_array_equal(onnx_gains, gains.numpy())  # the gain path is not quantized
    assert (onnx_codes[..., 0] == codes.numpy()[..., 0]).mean() > 0.8
    offline = model.decode(codes, gains, TINY.num_codebooks).numpy()[:, :-L]
    streamed = onnx_codec.decode(codes.numpy(), gains.numpy(), TINY.num_codebooks)[:, L:]
    error_db = 10 * np.log10(np.sum((streamed - offline) ** 2) / np.sum(offline**2))
    assert error_db < -25.0


def test_int8_graphs_compute_each_stream_independently_of_the_batch(tmp_path: Path) -> None:
    export_model(tmp_path, model=random_model(TINY, seed=6), model_id="t8b", weights="int8")
    onnx_codec = OnnxCodec(tmp_path)
    pcm = speechlike(6, batch=3).numpy()
    pcm[1] *= 8.0  # a much louder neighbour must not change the others' quantization
    batched_codes, _ = onnx_codec.encode(pcm)
    alone_codes, _ = onnx_codec.encode(pcm[2:3])
    np.testing.assert_array_equal(batched_codes[2:3], alone_codes)
    batched = onnx_codec.decode(batched_codes, np.full(batched_codes.shape[:2], 40), 4)
    alone = onnx_codec.decode(alone_codes, np.full(alone_codes.shape[:2], 40), 4)
    np.testing.assert_allclose(batched[2:3], alone, atol=1e-6)


def _run_encoder(session, pcm: np.ndarray, counts: np.ndarray) -> np.ndarray:
    feeds = {"pcm": pcm, "num_codebooks": counts}
    for tensor in session.get_inputs():
        if tensor.name.startswith("in_"):
            feeds[tensor.name] = np.zeros((pcm.shape[0], *tensor.shape[1:]), np.float32)
    return session.run(["codes"], feeds)[0]


def test_quantizer_gates_skip_only_the_stages_no_stream_wants(tmp_path: Path) -> None:
    """Gates at other split points (models/gating.py): the first k codes never change, the
    stages past the batch's largest count are skipped (0); a graph is gated only once."""
    import onnxruntime as ort

    from models.gating import gate_quantizer_stages

    model = random_model(TINY, seed=7)
    export_model(tmp_path, model=model, model_id="gates")  # default gates (1, 3)
    q = TINY.num_codebooks
    with pytest.raises(ValueError, match="already has a num_codebooks input"):
        gate_quantizer_stages(tmp_path / "encoder.onnx", q)
    pcm = speechlike(1, batch=3).numpy()
    codes, _ = model.encode(torch.from_numpy(pcm))
    session = ort.InferenceSession(str(tmp_path / "encoder.onnx"))
    for counts, wanted in (([1, 1, 1], 1), ([1, 2, 1], 3), ([3, 1, 2], 3), ([1, q, 2], q)):
        got = _run_encoder(session, pcm, np.array(counts, np.int64))
        np.testing.assert_array_equal(got[:, :wanted], codes[:, 0, :wanted].numpy())
        assert (got[:, wanted:] == 0).all()
    from models.export import export_graphs

    plain = tmp_path / "plain"
    export_graphs(model, plain)
    gate_quantizer_stages(plain / "encoder.onnx", q, splits=())  # the input, no gates
    ungated = ort.InferenceSession(str(plain / "encoder.onnx"))
    got = _run_encoder(ungated, pcm, np.ones(3, np.int64))
    np.testing.assert_array_equal(got, codes[:, 0].numpy())
