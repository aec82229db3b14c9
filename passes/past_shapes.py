"""Shape reads of the past caches -> the same numbers from input_ids and attention_mask.

Exporters read the batch size or the past length off ``past_key_values.*`` (torch.onnx.export's
``Shape -> Gather``, the dynamo exporter's ``Shape(start, end)``): the batch for every Reshape, the past
length for the causal mask. The ring-buffer pass replaces each past by a fixed-capacity ring, so such a
read would either block it or return the capacity. In the concat form these numbers are also
  batch       = input_ids.shape[0]
  past length = attention_mask.shape[1] - input_ids.shape[1]
and kv heads / head size are constants, so every Shape of a past input is rebuilt from those: the graph
computes the same values (the pass keeps inputs and outputs, so ``--verify`` checks it) and the caches
are left with only their Attention consumers. A past-length read that stays live after the ring rewrite
(not only feeding the mask) still reads attention_mask, which the ring pass then refuses by name.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kvc.contract import ATTENTION_MASK, INPUT_IDS, PAST_RE
from kvc.passes._patterns import attr_int, const_ints
from kvc.passes.base import KvcPass, PassReport

__all__ = ["PastShapesFromInputsPass"]

_BATCH, _HEADS, _PAST, _SIZE = range(4)


class PastShapesFromInputsPass(KvcPass):
    name = "past_shapes"

    def apply(self, model: ir.Model) -> PassReport:
        report = PassReport(self.name)
        graph = model.graph
        inputs = {v.name: v for v in graph.inputs}
        ids, mask = inputs.get(INPUT_IDS), inputs.get(ATTENTION_MASK)
        pasts = [v for v in graph.inputs if PAST_RE.match(v.name or "")]
        reads = [(past, node) for past in pasts for node, _ in list(past.uses()) if node.op_type == "Shape"]
        if not reads:
            return report
        _fold_shape_gathers(graph, [node for _, node in reads])
        reads = [(past, node) for past in pasts for node, _ in list(past.uses()) if node.op_type == "Shape"]
        builder = _DimBuilder(graph, ids, mask)
        for past, node in reads:
            dims = _dims_read(node)
            if dims is None:
                report.notes.append(f"Shape node {node.name!r} of {past.name}: the past is not 4-D")
                continue
            parts = [builder.dim(past, d) for d in dims]
            if any(p is None for p in parts):
                missing = INPUT_IDS if ids is None else ATTENTION_MASK
                report.notes.append(f"Shape node {node.name!r} reads {past.name}'s dimensions {dims} and the graph "
                                    f"has no {missing} input to read them from")
                continue
            builder.replace(node, parts)
            report.matched += 1
        graph.sort()  # the tape appended the new reads at the end
        return report


def _dims_read(shape_node: ir.Node) -> list[int] | None:
    """The dimensions of the rank-4 past that Shape(start, end) returns."""
    past = shape_node.inputs[0]
    rank = past.shape.rank() if past.shape is not None else 4
    if rank != 4:
        return None
    start, end = attr_int(shape_node, "start", 0), attr_int(shape_node, "end", rank)
    return list(range(4))[slice(start, end)]


def _fold_shape_gathers(graph: ir.Graph, shape_nodes: list[ir.Node]) -> None:
    """Gather(Shape(past), constant i) -> Shape(past, start, end) (+ Squeeze for a scalar i), so each read
    names only the dimensions it uses (a batch read then no longer also reads the past length)."""
    for shape_node in shape_nodes:
        base = attr_int(shape_node, "start", 0)
        if base < 0 or "end" in shape_node.attributes:
            continue
        for user, _ in list(shape_node.outputs[0].uses()):
            index = const_ints(user.inputs[1]) if user.op_type == "Gather" and len(user.inputs) > 1 else None
            if index is None or len(index) != 1 or attr_int(user, "axis", 0) != 0 or index[0] < 0:
                continue
            dim = base + index[0]
            tape = ir.tape.Tape(graph)
            read = tape.op("Shape", [shape_node.inputs[0]], {"start": dim, "end": dim + 1})
            scalar = user.inputs[1].shape is not None and user.inputs[1].shape.rank() == 0
            if scalar:
                read = tape.op("Squeeze", [read, _axis0(graph)])
            ir.convenience.replace_all_uses_with(user.outputs[0], read, replace_graph_outputs=True)
            graph.remove(user, safe=True)
        if not shape_node.outputs[0].uses() and not shape_node.outputs[0].is_graph_output():
            graph.remove(shape_node, safe=True)


def _axis0(graph: ir.Graph) -> ir.Value:
    name = "kvc_past_shapes.axis0"
    if name not in graph.initializers:
        graph.register_initializer(ir.Value(name=name, const_value=ir.tensor(np.array([0], np.int64), name=name)))
    return graph.initializers[name]


class _DimBuilder:
    """1-D int64 values for one dimension of a past, made once each and shared."""

    def __init__(self, graph: ir.Graph, ids: ir.Value | None, mask: ir.Value | None):
        self.graph, self.ids, self.mask = graph, ids, mask
        self.tape = ir.tape.Tape(graph)
        self._made: dict[tuple, ir.Value] = {}

    def dim(self, past: ir.Value, axis: int) -> ir.Value | None:
        if axis in (_HEADS, _SIZE):
            size = past.shape[axis] if past.shape is not None else None
            if isinstance(size, int):
                return self._const(f"kvc_past_shapes.dim{axis}_{size}", size)
            return self._read(past, axis)  # symbolic: still a shape read, but the ring keeps heads and size
        if self.ids is None:
            return None
        if axis == _BATCH:
            return self._read(self.ids, 0)
        if self.mask is None:
            return None
        key = ("past_len",)
        if key not in self._made:
            self._made[key] = self.tape.op("Sub", [self._read(self.mask, 1), self._read(self.ids, 1)])
        return self._made[key]

    def replace(self, shape_node: ir.Node, parts: list[ir.Value]) -> None:
        value = parts[0] if len(parts) == 1 else self.tape.op("Concat", parts, {"axis": 0})
        ir.convenience.replace_all_uses_with(shape_node.outputs[0], value, replace_graph_outputs=True)
        self.graph.remove(shape_node, safe=True)

    def _read(self, value: ir.Value, axis: int) -> ir.Value:
        key = (value.name, axis)
        if key not in self._made:
            self._made[key] = self.tape.op("Shape", [value], {"start": axis, "end": axis + 1})
        return self._made[key]

    def _const(self, name: str, number: int) -> ir.Value:
        if name not in self._made:
            self._made[name] = self.tape.initializer(ir.tensor(np.array([number], np.int64), name=name))
        return self._made[name]
