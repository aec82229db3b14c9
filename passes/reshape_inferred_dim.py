"""The size of a Reshape's -1 dim, proven by cancelling symbolic dims, written onto its output's shape.

Why: TorchScript exports split heads as ``x.view(*x.shape[:-1], -1, head_dim)``. ONNX shape inference only
resolves -1 when every input dim is an integer, so with symbolic batch and sequence dims the head count is
lost ([batch, seq, 64] -> [batch, seq, unk, 16]), and so is every shape computed from it downstream (TVM's
importer then meets Reshape targets it cannot make static). The input's dims are a product of symbols and
integers; when the output's other dims take exactly the input's symbols, what is left of the product is an
integer: the -1 dim. ONNX shape inference keeps a dim already written on a value (it fills in unknowns
only), so a later inference propagates the count to everything downstream.
"""
from __future__ import annotations

import math
from collections import Counter

import onnx_ir as ir


def is_known(dim) -> bool:
    """An integer, or a symbol the exporter named (ONNX's own ``unk__N`` stand for nothing known)."""
    return isinstance(dim, int) or (isinstance(dim, ir.SymbolicDim) and dim.value is not None
                                    and not str(dim.value).startswith("unk__"))


def cancelled_size(in_shape: ir.Shape, out_dims: list) -> int | ir.SymbolicDim | None:
    """What the unknown out dim must be so that ``out_dims`` (the others) hold as many elements as
    ``in_shape``: an integer when all symbols cancel, the one symbol left when the integers cancel too
    (GPT-2's ``input_ids.view(-1, seq)`` keeps ``batch``), or None."""
    if not all(is_known(d) for d in in_shape) or not all(is_known(d) for d in out_dims):
        return None
    symbols_in = Counter(str(d.value) for d in in_shape if not isinstance(d, int))
    symbols_out = Counter(str(d.value) for d in out_dims if not isinstance(d, int))
    if symbols_out - symbols_in:
        return None
    numerator = math.prod(d for d in in_shape if isinstance(d, int))
    denominator = math.prod(d for d in out_dims if isinstance(d, int))
    if denominator == 0 or numerator % denominator:
        return None
    left = list((symbols_in - symbols_out).elements())
    if not left:
        return numerator // denominator
    return ir.SymbolicDim(left[0]) if len(left) == 1 and numerator == denominator else None


def resolve_reshape_dims(model: ir.Model) -> int:
    """Write the proven size of each Reshape output's single unknown dim; returns how many were written."""
    resolved = 0
    for node in model.graph:
        if node.op_type != "Reshape" or node.domain != "" or node.inputs[0] is None:
            continue
        data, out = node.inputs[0], node.outputs[0]
        if data.shape is None or out.shape is None:
            continue
        unknown = [i for i, d in enumerate(out.shape) if not is_known(d)]
        if len(unknown) != 1:
            continue
        size = cancelled_size(data.shape, [d for i, d in enumerate(out.shape) if i != unknown[0]])
        if size is None:
            continue
        dims = list(out.shape)
        dims[unknown[0]] = size
        out.shape = ir.Shape(dims)
        resolved += 1
    if resolved:
        forget_unknown_shapes(model.graph)
    return resolved


def forget_unknown_shapes(graph: ir.Graph) -> None:
    """Drop recorded shapes with unknown dims (graph outputs excepted): ONNX shape inference keeps a symbol
    already recorded on a value, so a stale ``unk__N`` downstream would shadow a symbol proven here."""
    outputs = {id(v) for v in graph.outputs}
    for node in graph:
        for value in node.outputs:
            if id(value) not in outputs and value.shape is not None and not all(is_known(d) for d in value.shape):
                value.shape = None
