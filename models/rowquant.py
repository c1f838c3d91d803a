"""8-bit Linear layers for the exported graphs: integer matmuls, activations quantised per row.

Each Linear layer's MatMul ``y = x @ W`` (x [B, T, K], W [K, N]) becomes

    s  = max(max_k |x[b, t, k]| / r, s_min)              per row: one stream's one frame
    xq = u8(round(x / s) + z)                            activations in [0, 255]
    y  = (xq - z) @ Wq * w_scale * s                      MatMulIntegerToFloat, then Mul

with ``Wq`` int8 and one scale per output channel (``w_scale`` [N]). onnxruntime runs the
u8 x s8 product on its integer GEMM (AMX or AVX512-VNNI where the CPU has them), 2-4x faster
than the blockwise 8-bit kernel (MatMulNBits) from 16 rows up, and the integer sums are
exact, so each row's result does not depend on the others in the batch: a stream computes
the same bits alone or batched with any neighbours (the engine's batched == unbatched
guarantee).

Two activation layouts:

* symmetric (z = 128, r = 127, s_min tiny): LayerNorm outputs and the input layers;
* GELU outputs (the ConvNeXt blocks' ``down`` layers: values >= -0.17): z = 16, r = 239,
  s_min = 0.17 / 15.5, so the 255 levels cover [-16 s, 239 s] and the step is about half
  the symmetric one for the same row maximum.

Weight scales are chosen per output channel to minimise the squared rounding error of the
column (clipping its largest values a little when that helps), not just from its maximum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
from onnx import TensorProto, helper

__all__ = [
    "GELU_RANGE",
    "SYMMETRIC_RANGE",
    "ActivationRange",
    "quantize_columns",
    "quantize_matmuls_per_row",
]

_CLIP_RATIOS = np.linspace(1.0, 0.7, 31)
"""Candidate clipping points of a weight column, as fractions of its largest magnitude."""


@dataclass(frozen=True)
class ActivationRange:
    """How a row of activations maps to u8: zero point, levels above it, smallest step."""

    zero_point: int
    levels: int
    min_step: float


SYMMETRIC_RANGE = ActivationRange(zero_point=128, levels=127, min_step=1e-30)
GELU_RANGE = ActivationRange(zero_point=16, levels=239, min_step=0.17 / 15.5)
"""GELU's minimum is -0.16997: 16 steps of at least 0.17 / 15.5 below zero cover it."""


def quantize_columns(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weight [K, N] float -> (int8 [K, N], scale [N] float32), per column the scale in
    ``_CLIP_RATIOS`` x max|column| / 127 with the smallest squared rounding error."""
    w = weight.astype(np.float64)
    peak = np.maximum(np.abs(w).max(axis=0), 1e-30)
    best_err = np.full(w.shape[1], np.inf)
    best_scale = peak / 127.0
    for ratio in _CLIP_RATIOS:
        scale = ratio * peak / 127.0
        err = ((np.clip(np.round(w / scale), -127, 127) * scale - w) ** 2).sum(axis=0)
        better = err < best_err
        best_err[better], best_scale[better] = err[better], scale[better]
    scale32 = best_scale.astype(np.float32)
    q = np.clip(np.round(w / scale32.astype(np.float64)), -127, 127).astype(np.int8)
    return q, scale32


def _constant(graph: onnx.GraphProto, name: str, value: np.ndarray) -> str:
    if not any(init.name == name for init in graph.initializer):
        graph.initializer.append(onnx.numpy_helper.from_array(value, name))
    return name


def _range_constants(graph: onnx.GraphProto, rng: ActivationRange) -> tuple[str, ...]:
    z = rng.zero_point
    return (
        _constant(graph, f"rowq_inv_levels_{rng.levels}", np.array(1.0 / rng.levels, np.float32)),
        _constant(graph, f"rowq_min_step_{z}", np.array(rng.min_step, np.float32)),
        _constant(graph, f"rowq_zero_{z}", np.array(float(z), np.float32)),
        _constant(graph, f"rowq_zero_u8_{z}", np.array(z, np.uint8)),
    )


def _row_matmul(graph: onnx.GraphProto, node: onnx.NodeProto, weight: np.ndarray,
                rng: ActivationRange) -> list[onnx.NodeProto]:
    """The nodes that replace one float MatMul (same input and output names)."""
    x, y = node.input[0], node.output[0]
    p = f"{node.name or y}/rowq"
    q, scale = quantize_columns(weight)
    wq = _constant(graph, f"{p}/weight", q)
    ws = _constant(graph, f"{p}/weight_scale", scale)
    inv, min_step, zero, zero_u8 = _range_constants(graph, rng)
    one = _constant(graph, "rowq_one", np.array(1.0, np.float32))
    return [
        helper.make_node("Abs", [x], [f"{p}/abs"], name=f"{p}/Abs"),
        helper.make_node("ReduceMax", [f"{p}/abs"], [f"{p}/max"], axes=[-1], keepdims=1,
                         name=f"{p}/ReduceMax"),
        helper.make_node("Mul", [f"{p}/max", inv], [f"{p}/step0"], name=f"{p}/Step"),
        helper.make_node("Max", [f"{p}/step0", min_step], [f"{p}/step"], name=f"{p}/MinStep"),
        helper.make_node("Div", [x, f"{p}/step"], [f"{p}/scaled"], name=f"{p}/Div"),
        helper.make_node("Round", [f"{p}/scaled"], [f"{p}/rounded"], name=f"{p}/Round"),
        helper.make_node("Add", [f"{p}/rounded", zero], [f"{p}/shifted"], name=f"{p}/Shift"),
        helper.make_node("Cast", [f"{p}/shifted"], [f"{p}/xq"], to=TensorProto.UINT8,
                         name=f"{p}/Cast"),
        helper.make_node("MatMulIntegerToFloat", [f"{p}/xq", wq, one, ws, zero_u8, ""],
                         [f"{p}/product"], domain="com.microsoft", name=f"{p}/MatMul"),
        helper.make_node("Mul", [f"{p}/product", f"{p}/step"], [y], name=f"{p}/Rescale"),
    ]


def quantize_matmuls_per_row(path: Path, ranges: dict[str, ActivationRange]) -> int:
    """Rewrite the float MatMuls named in ``ranges`` (node name -> activation range) of the
    graph at ``path`` in place; return how many. Their weights must be initializers."""
    model = onnx.load(str(path))
    graph = model.graph
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset >= 18:  # ReduceMax takes its axes as an input from opset 18 on
        raise ValueError(f"{path}: opset {opset}; the rewrite writes opset <= 17 nodes")
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    constants = {init.name: init for init in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    replaced: list[str] = []
    for node in list(graph.node):
        rng = ranges.get(node.name) if node.op_type == "MatMul" else None
        if rng is None:
            nodes.append(node)
            continue
        weight = onnx.numpy_helper.to_array(constants[node.input[1]]).astype(np.float32)
        nodes.extend(_row_matmul(graph, node, weight, rng))
        replaced.append(node.input[1])
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused(graph, replaced)
    onnx.save(model, str(path))
    return len(replaced)


def _inputs(nodes: Sequence[onnx.NodeProto]) -> set[str]:
    """Every name the nodes read, subgraphs (If branches) included."""
    names: set[str] = set()
    for node in nodes:
        names.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                names |= _inputs(sub.node)
    return names


def _drop_unused(graph: onnx.GraphProto, candidates: Sequence[str]) -> None:
    """Remove the initializers in ``candidates`` that no node reads any more."""
    unused = set(candidates) - _inputs(graph.node)
    keep = [init for init in graph.initializer if init.name not in unused]
    del graph.initializer[:]
    graph.initializer.extend(keep)
