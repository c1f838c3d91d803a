"""The 8-bit row-quantised matmul (models/rowquant.py) against numpy references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from models.rowquant import (
    GELU_RANGE,
    SYMMETRIC_RANGE,
    ActivationRange,
    quantize_columns,
    quantize_matmuls_per_row,
)

K, N = 48, 20


def _matmul_graph(path: Path, weight: np.ndarray) -> None:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="linear")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 1, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 1, N])],
        [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _reference(x: np.ndarray, weight: np.ndarray, rng: ActivationRange) -> np.ndarray:
    """What the rewritten graph computes, in float64 from the same integers."""
    q, scale = quantize_columns(weight)
    step = np.maximum(np.abs(x).max(-1, keepdims=True).astype(np.float32)
                      * np.float32(1 / rng.levels), np.float32(rng.min_step))
    xq = np.round(x / step) + rng.zero_point
    assert xq.min() >= 0 and xq.max() <= 255
    return ((xq - rng.zero_point) @ q.astype(np.float64)) * scale * step


@pytest.mark.parametrize("rng", [SYMMETRIC_RANGE, GELU_RANGE])
def test_rewritten_matmul_matches_its_integer_reference_and_the_float_product(
        tmp_path: Path, rng: ActivationRange) -> None:
    gen = np.random.default_rng(1)
    weight = (gen.standard_normal((K, N)) * 0.1).astype(np.float32)
    x = gen.standard_normal((5, 1, K)).astype(np.float32)
    if rng is GELU_RANGE:  # GELU outputs: >= -0.17
        x = np.maximum(x * 2.0, -0.16997).astype(np.float32)
    x[3] = 0.0  # an all-zero row must not divide by zero
    path = tmp_path / "m.onnx"
    _matmul_graph(path, weight)
    assert quantize_matmuls_per_row(path, {"linear": rng}) == 1
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.initializer if i.name == "w"] == []  # the float copy is gone
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": x})[0]
    np.testing.assert_allclose(y, _reference(x, weight, rng), rtol=1e-5, atol=1e-6)
    exact = x @ weight
    assert np.all(y[3] == 0.0)
    assert np.abs(y - exact).max() < 0.02 * np.abs(exact).max()


def test_each_row_is_computed_independently_of_the_others(tmp_path: Path) -> None:
    gen = np.random.default_rng(2)
    weight = (gen.standard_normal((K, N)) * 0.1).astype(np.float32)
    path = tmp_path / "m.onnx"
    _matmul_graph(path, weight)
    quantize_matmuls_per_row(path, {"linear": SYMMETRIC_RANGE})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = gen.standard_normal((33, 1, K)).astype(np.float32)
    x[7] *= 100.0  # a loud neighbour
    batched = session.run(None, {"x": x})[0]
    alone = np.concatenate([session.run(None, {"x": x[i : i + 1]})[0] for i in range(33)])
    np.testing.assert_array_equal(batched, alone)


def test_column_scales_never_do_worse_than_the_column_maximum() -> None:
    gen = np.random.default_rng(3)
    weight = gen.standard_normal((256, 64)).astype(np.float32)
    weight[0, :8] = 12.0  # outliers: clipping them a little lowers the column's error
    q, scale = quantize_columns(weight)
    assert q.dtype == np.int8 and scale.shape == (64,) and np.abs(q).max() <= 127
    by_max = np.abs(weight).max(0) / 127
    err_best = ((q * scale - weight) ** 2).sum(0)
    err_max = ((np.round(weight / by_max) * by_max - weight) ** 2).sum(0)
    assert np.all(err_best <= err_max * (1 + 1e-6))
    assert np.any(err_best < 0.9 * err_max)
