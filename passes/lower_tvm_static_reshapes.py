"""TVM lowering: Reshape targets computed from Shape ops -> constants with 0 (copy this input dim) and -1.

Exporters write ``x.view(b, s, heads, head_dim)`` as Reshape(x, Concat(Gather(Shape(x), 0),
Gather(Shape(x), 1), heads, head_dim)). With two symbolic dims (batch, seq) the target cannot be
a plain constant, but when each symbolic output dim is the input's dim at the same position it is
``[0, 0, heads, head_dim]`` (ONNX Reshape: 0 copies the input dim). Compilers that need static
reshape targets (TVM's Relax importer) then see no shape arithmetic at all.
"""
from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, ShapeInferencePass
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchResult

from kvc.passes.base import KvcPass, PassReport


def static_target(in_shape: ir.Shape, out_shape: ir.Shape) -> list[int] | None:
    """The constant Reshape target for in_shape -> out_shape, or None if there is none."""
    dims: list[int] = []
    unknown = 0
    for i, d in enumerate(out_shape):
        if isinstance(d, int):
            if d == 0:
                return None  # a real zero-size dim would need allowzero; leave it alone
            dims.append(d)
        elif i < len(in_shape) and not isinstance(in_shape[i], int) and in_shape[i] == d:
            dims.append(0)
        else:
            unknown += 1
            dims.append(-1)
    return dims if unknown <= 1 else None


class _ReshapeToStatic(pattern.RewriteRuleClassBase):
    def pattern(self, op, data, shape):
        return op.Reshape(data, shape, _allow_other_attributes=True)

    def check(self, context, data: ir.Value, shape: ir.Value) -> MatchResult:
        result = MatchResult()
        if shape.const_value is not None:
            return result.fail("target is already a constant")
        node = context.nodes[0] if hasattr(context, "nodes") else None
        out = context.output_values[0]
        if data.shape is None or out.shape is None:
            return result.fail("input or output shape unknown (run shape inference)")
        allowzero = node.attributes.get_int("allowzero", 0) if node is not None else 0
        if allowzero:
            return result.fail("allowzero=1: 0 would mean an empty dim")
        self._target = static_target(data.shape, out.shape)
        if self._target is None:
            return result.fail(f"{data.shape} -> {out.shape}: more than one dim not copied from the input")
        return result

    def rewrite(self, op, data: ir.Value, shape: ir.Value):
        return op.Reshape(data, op.Constant(value=ir.tensor(self._target, dtype=ir.DataType.INT64)))


SHAPE_PRESERVING = {"RotaryEmbedding", "RMSNormalization"}


def _refine_shapes(model: ir.Model) -> None:
    """Fill in what ONNX shape inference leaves symbolic-unknown: RotaryEmbedding and
    RMSNormalization keep their input's shape, a 4-D Attention's output is
    [batch, q_heads, seq, v_head_dim], and a Transpose permutes its input's dims."""
    model.graph.sort()
    for node in model.graph:
        out = node.outputs[0] if node.outputs else None
        if node.op_type in SHAPE_PRESERVING and out is not None and node.inputs[0].shape is not None:
            out.shape = ir.Shape(list(node.inputs[0].shape))
        elif node.op_type == "Attention" and out is not None:
            q, v = node.inputs[0], node.inputs[2]
            if q is not None and v is not None and q.shape is not None and v.shape is not None \
                    and len(q.shape) == 4 and len(v.shape) == 4:
                out.shape = ir.Shape([q.shape[0], q.shape[1], q.shape[2], v.shape[3]])
        elif node.op_type == "Transpose" and out is not None and node.inputs[0].shape is not None:
            perm = node.attributes.get_ints("perm", None)
            source = node.inputs[0].shape
            if perm is not None and len(perm) == len(source):
                out.shape = ir.Shape([source[p] for p in perm])


class LowerTvmStaticReshapesPass(KvcPass):
    name = "lower_tvm_static_reshapes"

    def apply(self, model: ir.Model) -> PassReport:
        report = PassReport(self.name)
        ShapeInferencePass()(model)
        _refine_shapes(model)
        rules = pattern.RewriteRuleSet([_ReshapeToStatic.rule()])
        report.matched = rules.apply_to_model(model)
        RemoveUnusedNodesPass()(model)
        return report
