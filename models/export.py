"""ONNX export of the codec's streaming steps, with the model card (card.json + metadata).

``encoder.onnx``: ``step(pcm, num_codebooks, *in_state) -> (codes, gain_index, lowband,
*out_state)`` (quantizer stages no stream of the batch needs are skipped: models/gating.py)
``decoder.onnx``: ``step(codes, num_codebooks, gain_index, lowband, lowband_mask, *in_state)
-> (pcm, *out_state)``
See docs/model-interface.md for names, shapes and the card's fields.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
import torch
from torch import nn

from models.codec import CausalCodec, CodecConfig, count_parameters, mflops_per_second
from models.gating import gate_quantizer_stages

CARD_FORMAT = "codecstream-model"
CARD_VERSION = 3
METADATA_KEY = "codecstream.card"
OPSET = 17

TRAINING_DATA = [
    {"source": "LibriSpeech excerpts (train-clean-100 and others)", "license": "CC-BY-4.0"},
    {"source": "Debian game/education voice packages (tuxpaint-stamps-default, fillets-ng-data-"
               "cs/nl, klettres-data, ktuberling-data, hedgewars-data, megaglest-data, flight-of-"
               "the-amazon-queen, drascula*, asterisk-core-sounds-*)",
     "license": "per package: GPL-2/GPL-2+, CC-BY-SA, freeware game data (see Debian copyright)"},
]


class EncoderStep(nn.Module):
    def __init__(self, model: CausalCodec):
        super().__init__()
        self.model = model

    def forward(self, pcm: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        codes, gain_index, lowband, new_states = self.model.encoder_step(pcm, list(states))
        return (codes, gain_index, lowband, *new_states)


class DecoderStep(nn.Module):
    def __init__(self, model: CausalCodec):
        super().__init__()
        self.model = model

    def forward(self, codes: torch.Tensor, num_codebooks: torch.Tensor, gain_index: torch.Tensor,
                lowband: torch.Tensor, lowband_mask: torch.Tensor,
                *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pcm, new_states = self.model.decoder_step(codes, num_codebooks, gain_index, lowband,
                                                  lowband_mask, list(states))
        return (pcm, *new_states)


def load_checkpoint(path: Path) -> tuple[CausalCodec, dict[str, Any]]:
    """Model (eval mode) and the checkpoint's metadata (step, config) from a .pt file."""
    blob = torch.load(path, map_location="cpu", weights_only=False)
    codec_config = CodecConfig(**blob["config"]["codec"])
    model = CausalCodec(codec_config)
    model.load_state_dict(blob["model"])
    model.eval()
    return model, {"step": int(blob.get("step", 0)), "config": blob["config"],
                   "prior_steps": int(blob.get("prior_steps", 0))}


def save_weights(checkpoint: Path, out: Path, model_id: str) -> None:
    """Weights-only fp16 copy of a training checkpoint (for fine-tuning, about 10 MB)."""
    blob = torch.load(checkpoint, map_location="cpu", weights_only=False)
    weights = {k: v.half() if v.is_floating_point() else v for k, v in blob["model"].items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": weights, "step": blob["step"], "config": blob["config"],
                "prior_steps": int(blob.get("prior_steps", 0)), "model_id": model_id}, out)


def random_model(config: CodecConfig | None = None, seed: int = 0) -> CausalCodec:
    """An untrained model whose codebooks are initialised (for tests and scaffolding)."""
    torch.manual_seed(seed)
    model = CausalCodec(config or CodecConfig())
    model.train()
    with torch.no_grad():
        model(0.1 * torch.randn(2, model.config.frame_size * 40))
    model.eval()
    return model


def _export_graph(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path,
                  inputs: list[str], outputs: list[str]) -> None:
    dynamic = {name: {0: "batch"} for name in inputs + outputs}
    torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                      dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)


def fold_layer_scales(model: CausalCodec) -> CausalCodec:
    """A copy of ``model`` whose ConvNeXt layer scales are folded into their ``down`` layers
    (same function, one Mul fewer per block in the graphs)."""
    folded = copy.deepcopy(model)
    for network in (folded.encoder, folded.decoder):
        for block in network.blocks:
            block.fold_layer_scale()
    return folded


def export_graphs(model: CausalCodec, out_dir: Path,
                  fold_scales: bool = True) -> dict[str, list[dict[str, Any]]]:
    """Write encoder.onnx and decoder.onnx; return the state tables for the card."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if fold_scales:
        model = fold_layer_scales(model)
    config = model.config
    batch = 2
    enc_states = model.encoder_state_shapes()
    dec_states = model.decoder_state_shapes()
    pcm = torch.zeros(batch, config.frame_size)
    enc_in = ["pcm"] + [f"in_{n}" for n, _ in enc_states]
    enc_out = ["codes", "gain_index", "lowband"] + [f"out_{n}" for n, _ in enc_states]
    with torch.no_grad():
        _export_graph(EncoderStep(model), (pcm, *model.initial_state("encoder", batch)),
                      out_dir / "encoder.onnx", enc_in, enc_out)
        codes = torch.zeros(batch, config.num_codebooks, dtype=torch.int64)
        counts = torch.full((batch,), config.num_codebooks, dtype=torch.int64)
        gains = torch.zeros(batch, dtype=torch.int64)
        lowband = torch.zeros(batch, config.lowband_bins)
        dec_in = (["codes", "num_codebooks", "gain_index", "lowband", "lowband_mask"]
                  + [f"in_{n}" for n, _ in dec_states])
        dec_out = ["pcm"] + [f"out_{n}" for n, _ in dec_states]
        _export_graph(DecoderStep(model), (codes, counts, gains, lowband, lowband,
                                           *model.initial_state("decoder", batch)),
                      out_dir / "decoder.onnx", dec_in, dec_out)

    def table(states: list[tuple[str, tuple[int, ...]]]) -> list[dict[str, Any]]:
        return [{"name": n, "shape": list(s), "dtype": "float32"} for n, s in states]

    return {"encoder": table(enc_states), "decoder": table(dec_states)}


def bitrates(config: CodecConfig) -> dict[str, float]:
    """Nominal kbps per codebook count without low band: (4 + gain bits + 1 + 10 * count)
    bits per frame (the 1 bit: the low-band layout field saying "none")."""
    code_bits = int(np.log2(config.codebook_size))
    frames_per_s = config.sample_rate / config.frame_size
    return {str(q): (4 + config.gain_bits + 1 + code_bits * q) * frames_per_s / 1000
            for q in range(1, config.num_codebooks + 1)}


def build_card(model: CausalCodec, states: dict[str, list[dict[str, Any]]], model_id: str,
               random_weights: bool, meta: dict[str, Any], quality: dict[str, Any] | None,
               measured_latency_ms: float | None) -> dict[str, Any]:
    config = model.config
    frame_ms = 1000 * config.frame_size / config.sample_rate
    overlap_ms = 1000 * config.overlap / config.sample_rate
    return {
        "format": CARD_FORMAT,
        "format_version": CARD_VERSION,
        "model_id": model_id,
        "random_weights": random_weights,
        "description": ("Causal MDCT-domain neural speech codec: shape-gain split, ConvNeXt "
                        "encoder/decoder over 20 ms frames, residual VQ with quantizer dropout"
                        + (" -- UNTRAINED RANDOM WEIGHTS, for tests only" if random_weights
                           else "")),
        "sample_rate": config.sample_rate,
        "frame_size": config.frame_size,
        "output_delay_samples": config.overlap,
        "num_codebooks": config.num_codebooks,
        "codebook_size": config.codebook_size,
        "code_bits": int(np.log2(config.codebook_size)),
        "lowband_bins": config.lowband_bins,
        "gain": {"bits": config.gain_bits, "min_db": config.gain_min_db,
                 "step_db": config.gain_step_db},
        "bitrates_kbps": bitrates(config),
        "encoder": {"file": "encoder.onnx", "states": states["encoder"]},
        "decoder": {"file": "decoder.onnx", "states": states["decoder"]},
        "latency_ms": {"frame": frame_ms, "overlap": overlap_ms,
                       "algorithmic": frame_ms + overlap_ms,
                       "measured": measured_latency_ms},
        "mflops_per_second": {k: round(v, 1) for k, v in mflops_per_second(config).items()},
        "parameters": {"encoder": count_parameters(model.encoder),
                       "decoder": count_parameters(model.decoder),
                       "quantizer": sum(int(s.embedding.numel())
                                        for s in model.quantizer.stages)},
        "training": {"steps": meta.get("step", 0), "data": TRAINING_DATA,
                     "config": meta.get("config"),
                     **{k: meta[k] for k in ("run_steps", "lineage") if k in meta}},
        "quality": quality or {},
    }


def round_weights_to_fp16(model: CausalCodec) -> None:
    """Round parameters and codebooks to fp16 precision in place (values stay float32), so an
    fp16-stored graph computes exactly what this model computes."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *(s.embedding for s in model.quantizer.stages)]:
            tensor.copy_(tensor.half().float())


def store_weights_as_fp16(path: Path, min_elements: int = 1024) -> None:
    """Store float32 initializers that are exactly representable in fp16 as fp16 + Cast.

    Halves the file; onnxruntime folds the casts when it loads the graph, so it still
    computes in float32. Initializers that fp16 would change (the MDCT basis) stay float32.
    """
    model = onnx.load(str(path))
    graph = model.graph
    casts = []
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or int(np.prod(init.dims)) < min_elements:
            continue
        values = onnx.numpy_helper.to_array(init)
        half = values.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), values):
            continue
        name = init.name
        init.CopyFrom(onnx.numpy_helper.from_array(half, f"{name}__fp16"))
        casts.append(onnx.helper.make_node("Cast", [f"{name}__fp16"], [name],
                                           to=onnx.TensorProto.FLOAT, name=f"{name}__cast"))
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    onnx.save(model, str(path))


def linear_weight_matmuls(path: Path, model: CausalCodec) -> dict[str, nn.Linear]:
    """The MatMul nodes of a graph whose constant operand is one of the encoder's or decoder's
    Linear weights: node name -> that Linear layer. The other MatMuls (MDCT bases, codebook
    distances, tracker) are not listed.

    Matched by value, not by node name, so it does not depend on the exporter's naming.
    """
    modules = [module for network in (model.encoder, model.decoder)
               for module in network.modules() if isinstance(module, nn.Linear)]
    weights = [(module, module.weight.detach().T.contiguous().numpy()) for module in modules]
    graph = onnx.load(str(path)).graph
    constants = {init.name: init for init in graph.initializer}
    found: dict[str, nn.Linear] = {}
    for node in graph.node:
        init = constants.get(node.input[1]) if node.op_type == "MatMul" else None
        if init is None:
            continue
        values = onnx.numpy_helper.to_array(init)
        for module, w in weights:
            if values.shape == w.shape and np.allclose(values, w, rtol=1e-5, atol=1e-7):
                found[node.name] = module
                break
    return found


def quantize_linear_weights(path: Path, model: CausalCodec) -> int:
    """Store the ConvNeXt blocks' Linear layers as 8-bit integer matmuls (models/rowquant.py):
    int8 weights with one scale per output channel, activations quantized to u8 per row at
    run time (``down``, which reads GELU outputs, with an asymmetric range); return how many.

    Each row (one stream's frame) is quantized on its own and the integer sums are exact, so
    each stream of a batch is computed independently of the others (batched == unbatched).
    The networks' input and output layers stay float (8-bit, the decoder's output layer alone
    cost 0.013 PESQ-WB at 6 kbps; docs/model.md), and so do the MDCT bases, codebooks and
    pitch tracker. The scale-folded model must be passed (the weights are matched by value).
    """
    from models.rowquant import GELU_RANGE, SYMMETRIC_RANGE, quantize_matmuls_per_row

    blocks = [block for network in (model.encoder, model.decoder) for block in network.blocks]
    chosen = {id(b.up): SYMMETRIC_RANGE for b in blocks} | {id(b.down): GELU_RANGE for b in blocks}
    ranges = {name: chosen[id(module)]
              for name, module in linear_weight_matmuls(path, model).items()
              if id(module) in chosen}
    return quantize_matmuls_per_row(path, ranges)


def embed_card(path: Path, card: dict[str, Any]) -> None:
    graph = onnx.load(str(path))
    del graph.metadata_props[:]
    entry = graph.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(card, sort_keys=True)
    onnx.save(graph, str(path))


WEIGHT_FORMATS = ("fp32", "fp16", "int8")


def export_model(out_dir: Path, checkpoint: Path | None = None, model_id: str | None = None,
                 quality: dict[str, Any] | None = None, model: CausalCodec | None = None,
                 random_weights: bool | None = None, weights: str = "fp32",
                 prior_steps: int | None = None, lineage: str | None = None) -> dict[str, Any]:
    """Export a checkpoint (or ``model``, or random weights) to ``out_dir``; return the card.

    ``random_weights`` labels the card; by default a model without a checkpoint is untrained.
    ``weights``: "fp32"; "fp16" rounds the weights (of ``model``, in place) to fp16 precision
    and stores them so (half the size, exact parity with the rounded model); "int8" also
    stores the ConvNeXt blocks' Linear layers as 8-bit integer matmuls (models/rowquant.py:
    about a quarter of the size, faster from 8 streams per call) and the rest as fp16.
    ``prior_steps``: steps of the runs the checkpoint was fine-tuned from (the card's
    training.steps and the model id count them too; default: what the checkpoint recorded);
    ``lineage``: free text for the card.
    """
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, not {weights!r}")
    meta: dict[str, Any] = {}
    if random_weights is None:
        random_weights = checkpoint is None
    if checkpoint is not None:
        model, meta = load_checkpoint(checkpoint)
        prior = meta.pop("prior_steps") if prior_steps is None else prior_steps
        meta["run_steps"] = meta["step"]
        meta["step"] = meta["step"] + prior
        if lineage:
            meta["lineage"] = lineage
    elif model is None:
        model = random_model()
    if weights != "fp32":
        round_weights_to_fp16(model)
    # fp16 keeps the layer scales apart so every stored weight is exactly an fp16 value
    states = export_graphs(model, out_dir, fold_scales=weights != "fp16")
    folded = fold_layer_scales(model) if weights == "int8" else None
    for name in ("encoder.onnx", "decoder.onnx"):
        if folded is not None:
            quantize_linear_weights(out_dir / name, folded)
        if weights != "fp32":
            store_weights_as_fp16(out_dir / name)
    gate_quantizer_stages(out_dir / "encoder.onnx", model.config.num_codebooks)
    digest = hashlib.sha256((out_dir / "decoder.onnx").read_bytes()).hexdigest()[:8]
    prefix = "cs-mdct-random" if random_weights else "cs-mdct"
    model_id = model_id or f"{prefix}-{meta.get('step', 0)}-{digest}"
    from models.measure import measured_latency_ms

    latency = measured_latency_ms(out_dir, model.config)
    card = build_card(model, states, model_id, random_weights, meta, quality, latency)
    card["weights"] = weights
    for name in ("encoder.onnx", "decoder.onnx"):
        embed_card(out_dir / name, card)
    (out_dir / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return card
