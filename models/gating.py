"""Run only the quantizer stages a batch needs: ONNX `If` gates around the residual VQ.

The exported encoder computes all Q residual-VQ stages every frame (one MatMul against a
1024 x D codebook and one ArgMin per stage), although a stream at 1, 3 or 6 kbps sends only
1 to 3 of their codes. :func:`gate_quantizer_stages` rewrites the encoder graph so that the
stages past each split point sit inside an ``If`` whose condition is "some stream of this
batch wants more codebooks", read from a new graph input ``num_codebooks`` [batch] (int64,
the codebooks each stream will send). Skipped stages output code 0, which no stream reads.

Stage k's code never depends on a later stage, so the codes a stream reads are the same
whatever the rest of its batch asks for (batched == unbatched still holds). Constant-only
nodes (fp16 -> fp32 casts of the codebooks) stay in the main graph, where onnxruntime folds
them once at load time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import onnx
from onnx import TensorProto, helper

COUNT_INPUT = "num_codebooks"


def _producers(nodes: Iterable[onnx.NodeProto]) -> dict[str, onnx.NodeProto]:
    return {out: node for node in nodes for out in node.output if out}


def _ancestors(values: Iterable[str], producers: dict[str, onnx.NodeProto]) -> set[int]:
    """ids of the nodes that `values` depend on (themselves included)."""
    seen: set[int] = set()
    stack = [producers[v] for v in values if v in producers]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.extend(producers[v] for v in node.input if v in producers)
    return seen


def _constant_nodes(graph: onnx.GraphProto) -> set[int]:
    """ids of the nodes computed from initializers and constants only."""
    known = {init.name for init in graph.initializer}
    constant: set[int] = set()
    for node in graph.node:  # topological order
        if all(not name or name in known for name in node.input):
            constant.add(id(node))
            known.update(node.output)
    return constant


def _stage_codes(graph: onnx.GraphProto, stages: int) -> tuple[onnx.NodeProto, list[str]]:
    """The Concat that assembles the codes and its inputs, in stage order (ArgMin outputs)."""
    argmin_outputs = {n.output[0] for n in graph.node if n.op_type == "ArgMin"}
    for node in graph.node:
        if node.op_type == "Concat" and node.input and all(i in argmin_outputs
                                                            for i in node.input):
            if len(node.input) != stages:
                raise ValueError(f"codes Concat has {len(node.input)} inputs, not {stages}")
            return node, list(node.input)
    raise ValueError("no Concat of ArgMin outputs (the residual VQ's codes) in the graph")


def _zeros_branch(like: str, outputs: Sequence[str], name: str) -> onnx.GraphProto:
    """Subgraph returning int64 zeros shaped like the outer value `like` for each output."""
    shape = f"{name}_shape"
    nodes = [helper.make_node("Shape", [like], [shape], name=f"{name}/Shape")]
    zero = helper.make_tensor("zero", TensorProto.INT64, [1], [0])
    for i, out in enumerate(outputs):
        nodes.append(helper.make_node("ConstantOfShape", [shape], [f"{name}_{out}"],
                                      value=zero, name=f"{name}/Zeros_{i}"))
    return helper.make_graph(nodes, name, [], [
        helper.make_tensor_value_info(f"{name}_{out}", TensorProto.INT64, None)
        for out in outputs])


def _gate(prefix: str, count_max: str, split: int, branch_nodes: list[onnx.NodeProto],
          outputs: list[str], like: str) -> tuple[list[onnx.NodeProto], list[str]]:
    """Nodes computing `outputs` only when max(num_codebooks) > split; renamed outputs."""
    threshold = helper.make_tensor(f"{prefix}_split", TensorProto.INT64, [], [split])
    cond = f"{prefix}_wanted"
    then_graph = helper.make_graph(branch_nodes, f"{prefix}_then", [], [
        helper.make_tensor_value_info(out, TensorProto.INT64, None) for out in outputs])
    gated = [f"{prefix}_{out}" for out in outputs]
    nodes = [
        helper.make_node("Constant", [], [f"{prefix}_split"], value=threshold,
                         name=f"{prefix}/Split"),
        helper.make_node("Greater", [count_max, f"{prefix}_split"], [cond],
                         name=f"{prefix}/Greater"),
        helper.make_node("If", [cond], gated, name=f"{prefix}/If", then_branch=then_graph,
                         else_branch=_zeros_branch(like, outputs, f"{prefix}_skip")),
    ]
    return nodes, gated


def gate_quantizer_stages(path: Path, stages: int, splits: Sequence[int] = (1, 3)) -> None:
    """Rewrite the encoder graph at `path` so stages >= each split run only when wanted.

    `stages`: the quantizer's Q; `splits`: ascending stage counts after which a gate opens
    (default: stage 1 always runs, stages 2-3 when some stream wants more than 1 codebook,
    stages 4..Q when some stream wants more than 3; splits >= Q are ignored, and with none
    left every stage always runs). Adds the graph input ``num_codebooks``.
    """
    splits = [s for s in splits if 0 < s < stages]
    if sorted(set(splits)) != list(splits):
        raise ValueError(f"splits must be ascending and distinct: {splits}")
    model = onnx.load(str(path))
    graph = model.graph
    if any(i.name == COUNT_INPUT for i in graph.input):
        raise ValueError(f"{path} already has a {COUNT_INPUT} input")
    concat, codes = _stage_codes(graph, stages)
    if splits:
        _insert_gates(graph, concat, codes, stages, splits)
    inputs = list(graph.input)  # num_codebooks goes right after pcm, as in the decoder
    del graph.input[:]
    graph.input.extend([inputs[0], helper.make_tensor_value_info(COUNT_INPUT, TensorProto.INT64,
                                                                 ["batch"]), *inputs[1:]])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _insert_gates(graph: onnx.GraphProto, concat: onnx.NodeProto, codes: list[str], stages: int,
                  splits: Sequence[int]) -> None:
    """Move the nodes of the stages past each split into nested `If` gates, in place."""
    producers = _producers(graph.node)
    constant = _constant_nodes(graph)
    # what the graph computes besides stages >= splits[0] (the walk stops at the Concat)
    upstream = {k: v for k, v in producers.items() if v is not concat}
    others = _ancestors([o.name for o in graph.output] + codes[: splits[0]], upstream)
    # group g: the nodes only stages [splits[g], next split) need
    bounds = [*splits, stages]
    groups: list[list[onnx.NodeProto]] = []
    claimed = others | constant
    for g, start in enumerate(splits):
        wanted = _ancestors(codes[start : bounds[g + 1]], producers) - claimed
        claimed |= wanted
        groups.append([n for n in graph.node if id(n) in wanted])
    moved = {id(n) for group in groups for n in group}
    # innermost gate first: each gate's then-branch holds its group plus the next gate
    count_max = "num_codebooks_max"
    inner: list[onnx.NodeProto] = []
    inner_outputs: list[str] = []
    for g in reversed(range(len(splits))):
        outputs = codes[splits[g] : bounds[g + 1]] + inner_outputs
        inner, inner_outputs = _gate(f"vq_gate{g}", count_max, splits[g], groups[g] + inner,
                                     outputs, codes[0])
    rename = dict(zip(codes[splits[0]:], inner_outputs, strict=True))
    concat.input[:] = [rename.get(c, c) for c in concat.input]
    reduce = helper.make_node("ReduceMax", [COUNT_INPUT], [count_max], keepdims=0,
                              name="vq_gate/ReduceMax")
    kept = [n for n in graph.node if id(n) not in moved]
    at = kept.index(concat)
    del graph.node[:]
    graph.node.extend([*kept[:at], reduce, *inner, *kept[at:]])
