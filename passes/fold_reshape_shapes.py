"""Reshape targets built at run time from Shape/Gather/Unsqueeze/Concat become constants.

Why: exporters write ``Reshape(x, Concat(Unsqueeze(Gather(Shape(h), 0)), Unsqueeze(Gather(Shape(h), 1)),
[H], [D]))`` for every q/k/v split and head merge: ~15 nodes per layer that ONNX Runtime dispatches on
every decode step (a 24-layer model: ~360 of its ~1000 nodes) to compute [batch, seq, H, D]. ONNX
Reshape's 0 means "copy this dim from the input", so when a piece provably equals the input's dim at
the same position the whole target is the constant [0, 0, H, D], and the plumbing is dead code.

Proof of equality: after ONNX shape inference (with data propagation), piece p is ``Shape(h)[i]`` and
dim i of h and dim p of the Reshape's data input are the same known value (the same symbolic name,
e.g. ``batch``, or the same integer). Pieces that are constants keep their values. A target with any
other piece, or a Reshape with allowzero=1, is left as it is.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from kvc.passes.base import KvcPass, PassReport
from kvc.passes.reshape_inferred_dim import is_known
from kvc.passes.unflatten_matmul import prove_reshapes

COPY_DIM = 0  # Reshape: 0 copies the input's dim at the same position (allowzero=0)


class FoldReshapeShapesPass(KvcPass):
    name = "fold_reshape_shapes"

    def apply(self, model: ir.Model) -> PassReport:
        graph = model.graph
        _hint_shapes(graph)
        common_passes.ShapeInferencePass()(model)
        proofs = prove_reshapes(model)  # after fusion: the attention's mask broadcasts no longer hide dims
        folded = 0
        for node in list(graph):
            target = _constant_target(node) if node.op_type == "Reshape" and node.domain == "" else None
            if target is not None:
                value = ir.tape.Tape(graph).initializer(ir.tensor(target, name=f"kvc_reshape.{folded}"))
                node.replace_input_with(1, value)
                folded += 1
        if folded:
            common_passes.RemoveUnusedNodesPass()(model)
        return PassReport(self.name, matched=folded + proofs.chains, notes=proofs.notes)


def _hint_shapes(graph: ir.Graph) -> None:
    """Output shapes ONNX's shape inference leaves unknown for ops that keep their input's shape
    (RotaryEmbedding; Attention's Y is Q's shape with V's head size), so the dims of later Reshape
    inputs can be proven."""
    outputs = {id(v) for v in graph.outputs}
    for node in graph:
        out = node.outputs[0] if node.outputs else None
        if out is None or id(out) in outputs:
            continue
        derived = _derived_shape(node)
        if derived is not None and _known_dims(derived) > _known_dims(out.shape):
            out.shape = derived
        elif out.shape is not None and _known_dims(out.shape) < len(out.shape):
            out.shape = None  # stale unknowns from an earlier inference would shadow what it can prove now


def _derived_shape(node: ir.Node) -> ir.Shape | None:
    if node.op_type == "RotaryEmbedding" and node.inputs[0] is not None:
        return node.inputs[0].shape
    if node.op_type == "Attention" and _rank(node.inputs[0]) == 4 and _rank(node.inputs[2]) == 4:
        q, v = node.inputs[0].shape, node.inputs[2].shape
        return ir.Shape([q[0], q[1], q[2], v[3]])
    return None


def _known_dims(shape: ir.Shape | None) -> int:
    return -1 if shape is None else sum(is_known(d) for d in shape)


def _rank(value: ir.Value | None) -> int | None:
    return None if value is None or value.shape is None else len(value.shape)


def _constant_target(reshape: ir.Node) -> np.ndarray | None:
    if "allowzero" in reshape.attributes and reshape.attributes["allowzero"].as_int() == 1:
        return None
    data, shape = reshape.inputs[0], reshape.inputs[1]
    concat = shape.producer() if shape is not None else None
    if data is None or data.shape is None or concat is None or concat.op_type != "Concat":
        return None
    target: list[int] = []
    for piece in concat.inputs:
        values = _piece_values(piece, data, len(target))
        if values is None:
            return None
        target.extend(values)
    return np.array(target, np.int64)


def _piece_values(piece: ir.Value | None, data: ir.Value, position: int) -> list[int] | None:
    """The piece's entries as constants (0 for a dim copied from ``data``), or None if unknown."""
    if piece is None:
        return None
    if piece.const_value is not None:
        return [int(v) for v in piece.const_value.numpy().reshape(-1)]
    source_dim = _shape_dim_reference(piece)
    if source_dim is None:
        return None
    source, index = source_dim
    if position >= len(data.shape) or index >= len(source.shape):
        return None
    same = is_known(data.shape[position]) and data.shape[position] == source.shape[index]
    return [COPY_DIM] if same else None


def _shape_dim_reference(piece: ir.Value) -> tuple[ir.Value, int] | None:
    """(h, i) when ``piece`` is Unsqueeze(Gather(Shape(h), i), [0]) with h's shape known."""
    unsqueeze = piece.producer()
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze":
        return None
    gather = unsqueeze.inputs[0].producer() if unsqueeze.inputs[0] is not None else None
    if gather is None or gather.op_type != "Gather" or gather.inputs[1] is None:
        return None
    shape_node = gather.inputs[0].producer()
    index = gather.inputs[1].const_value
    if shape_node is None or shape_node.op_type != "Shape" or index is None or index.numpy().size != 1:
        return None
    source = shape_node.inputs[0]
    if source is None or source.shape is None:
        return None
    if "start" in shape_node.attributes or "end" in shape_node.attributes:
        return None  # a slice of the shape: not worth the index arithmetic
    i = int(index.numpy().reshape(-1)[0])
    return source, i + len(source.shape) if i < 0 else i

