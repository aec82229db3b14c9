"""ORT lowering: projections that read the same activation become one MatMul over packed weights.

Why: at decode (one token per row) every MatMul is a GEMV that ONNX Runtime dispatches and splits
across threads on its own; q/k/v read the same normed hidden state, and so do gate/up. One MatMul
over the weights concatenated along N streams the same bytes with one dispatch and one thread
fork instead of three (two), and reads the activation once. onnxruntime-genai's builder emits
packed projections for the same reason. A Split hands each original consumer its columns.

Pattern (X any activation; W_i constant [K, N_i], same K and dtype; the MatMuls are X's users):
  Y_i = MatMul(X, W_i)  ->  Y = MatMul(X, Concat(W_1..W_n, axis=1)); Y_1..Y_n = Split(Y, axis=-1, [N_i])
Weights used anywhere else (tied embeddings, say) are left alone.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_ir as ir

from kvc.passes.base import KvcPass, PassReport

SPLIT_OPSET = 18  # Split takes its sizes as an input


class LowerOrtPackProjectionsPass(KvcPass):
    name = "lower_ort_pack_projections"

    def apply(self, model: ir.Model) -> PassReport:
        graph = model.graph
        report = PassReport(self.name)
        if graph.opset_imports.get("", 0) < SPLIT_OPSET:
            report.notes.append(f"opset below {SPLIT_OPSET}: projections left unpacked")
            return report
        for group in _projection_groups(graph):
            _pack(graph, group, report.matched)
            report.matched += 1
        if report.matched:
            graph.sort()
        return report


def _projection_groups(graph: ir.Graph) -> list[list[ir.Node]]:
    """MatMuls that share their activation input and have packable constant weights, 2+ per group."""
    by_input: dict[int, list[ir.Node]] = defaultdict(list)
    for node in graph:
        if node.op_type == "MatMul" and node.domain == "" and _packable_weight(graph, node) is not None:
            by_input[id(node.inputs[0])].append(node)
    groups = []
    for nodes in by_input.values():
        shapes = {(_packable_weight(graph, n).shape[0], _packable_weight(graph, n).dtype) for n in nodes}
        if len(nodes) >= 2 and len(shapes) == 1:
            groups.append(nodes)
    return groups


def _packable_weight(graph: ir.Graph, node: ir.Node) -> ir.TensorProtocol | None:
    """The constant [K, N] weight of ``node`` when only this node reads it."""
    if len(node.inputs) != 2 or node.inputs[0] is None:
        return None
    weight = node.inputs[1]
    if weight is None or weight.name not in graph.initializers or weight.const_value is None:
        return None
    if len(weight.uses()) != 1 or weight.shape is None or len(weight.shape) != 2:
        return None
    return weight.const_value


def _pack(graph: ir.Graph, nodes: list[ir.Node], index: int) -> None:
    weights = [n.inputs[1] for n in nodes]
    packed = np.concatenate([w.const_value.numpy() for w in weights], axis=1)
    tape = ir.tape.Tape(graph)
    packed_value = tape.initializer(ir.tensor(packed, name=f"kvc_packed.{index}.weight"))
    sizes = tape.initializer(ir.tensor(np.array([w.shape[1] for w in weights], np.int64),
                                       name=f"kvc_packed.{index}.sizes"))
    product = tape.op("MatMul", [nodes[0].inputs[0], packed_value])
    parts = tape.op_multi_out("Split", [product, sizes], {"axis": -1}, num_outputs=len(nodes))
    for node, part in zip(nodes, parts):
        old = node.outputs[0]
        part.dtype, part.shape = old.dtype, old.shape
        old.replace_all_uses_with(part, replace_graph_outputs=True)
        name = old.name
        graph.remove(node, safe=True)
        part.name = name
    for weight in weights:
        graph.initializers.pop(weight.name)
