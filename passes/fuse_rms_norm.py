"""x / sqrt(mean(x^2) + eps) * scale -> opset-23 RMSNormalization.

Covers the forms exporters and ONNX's own function body produce: x squared by Pow(x, 2) or
Mul(x, x); ReduceMean over any trailing axes; the inverse root as Reciprocal(Sqrt), Div(1, Sqrt)
(torch.rsqrt) or Div(x, Sqrt); optional Cast to a compute type before and back after; the
scale multiplied on either side. Without the eps Add it is not RMSNorm and does not match.
Modelled on onnxscript's rules/fusion/_rms_normalization.py, generalised to these variants.
"""
from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from kvc.passes._patterns import (FLOAT_TYPES, attr_int, const_ints, const_scalar, downstream_nodes,
                                  explain_no_match, rank, summarize)
from kvc.passes.base import KvcPass, PassReport

MIN_OPSET = 23
_STASH_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE})


class RmsNormFusion(pattern.RewriteRuleClassBase):
    def __init__(self):
        super().__init__("RmsNorm", remove_nodes=False)  # a Cast of x may feed other nodes

    def pattern(self, op, x, scale, exponent, axes, epsilon, one, compute_dtype, target_dtype):
        xc = pattern.OrValue([op.Cast(x, to=compute_dtype), x], tag_var="cast_in", tag_values=[True, False])
        square = pattern.OrValue([op.Pow(xc, exponent), op.Mul(xc, xc)], tag_var="square", tag_values=["Pow", "Mul"])
        mean = op.ReduceMean(square, axes, _allow_other_attributes=True, _outputs=["mean"])
        rms = op.Sqrt(op.Add(mean, epsilon))
        normalized = pattern.OrValue([op.Mul(xc, op.Reciprocal(rms)), op.Mul(xc, op.Div(one, rms)), op.Div(xc, rms)],
                                     tag_var="inverse", tag_values=["Reciprocal", "Div1", "Div"])
        normalized = pattern.OrValue([op.Cast(normalized, to=target_dtype), normalized],
                                     tag_var="cast_out", tag_values=[True, False])
        return op.Mul(normalized, scale, _outputs=["y"])

    def check(self, context, x, scale, mean, epsilon, y, **b) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if b.get("square") == "Pow" and const_scalar(b.get("exponent")) != 2.0:
            return result.fail("Pow exponent is not 2")
        if b.get("inverse") == "Div1" and const_scalar(b.get("one")) != 1.0:
            return result.fail("the reciprocal divides a value other than 1")
        eps = const_scalar(epsilon)
        if eps is None or eps < 0:
            return result.fail("epsilon is not a non-negative constant scalar")
        if x.dtype not in FLOAT_TYPES or scale.dtype not in FLOAT_TYPES:
            return result.fail("input or scale is not a float tensor")
        axis = _normalized_axis(mean.producer(), b.get("axes"), rank(x))
        if axis is None:
            return result.fail("ReduceMean does not reduce the trailing axes with keepdims=1")
        if rank(scale) is None or rank(scale) > rank(x) - axis:
            return result.fail("scale is not broadcastable to the normalized axes")
        compute = ir.DataType(b["compute_dtype"].as_int()) if b.get("cast_in") else x.dtype
        # fp16/bf16 statistics are computed in fp32 (what ONNX Runtime does anyway).
        self._attrs = {"axis": axis, "epsilon": eps,
                       "stash_type": int(compute if compute in _STASH_TYPES else ir.DataType.FLOAT)}
        return result

    def rewrite(self, op, x, scale, **_):
        return op.RMSNormalization(x, scale, **self._attrs)


def _normalized_axis(reduce_mean: ir.Node, axes_value: ir.Value | None, x_rank: int | None) -> int | None:
    """First normalized axis when ReduceMean averages axis..rank-1 and keeps dims, else None."""
    if x_rank is None or attr_int(reduce_mean, "keepdims", 1) != 1:
        return None
    axes = const_ints(axes_value) if axes_value is not None else list(range(x_rank))
    if not axes:
        return None
    axes = sorted(a % x_rank for a in axes)
    return axes[0] if axes == list(range(axes[0], x_rank)) else None


def rules() -> pattern.RewriteRuleSet:
    """Built per run: the rule keeps its match's attributes between check and rewrite."""
    return pattern.RewriteRuleSet([RmsNormFusion.rule()], commute=True)


class FuseRmsNormPass(KvcPass):
    name = "rms_norm"
    min_opset = MIN_OPSET

    def apply(self, model: ir.Model) -> PassReport:
        report = PassReport(self.name)
        report.matched = rules().apply_to_model(model)
        report.notes.extend(summarize(self.name, "ReduceMean(x^2) nodes", _leftover_reasons(model)))
        return report


def _leftover_reasons(model: ir.Model) -> list[str]:
    """Why each remaining mean of squares (the RMSNorm signature) was not fused."""
    reasons = []
    for node in model.graph:
        square = node.inputs[0].producer() if node.op_type == "ReduceMean" and node.inputs else None
        if square is None or square.op_type not in ("Pow", "Mul"):
            continue
        if not any(user.op_type == "Add" for user, _ in node.outputs[0].uses()):
            reasons.append("no epsilon is added to the mean of squares")
            continue
        anchors = [n for n in downstream_nodes(node, 6) if n.op_type == "Mul"]
        reasons.append(explain_no_match(rules().rules, model, anchors) if anchors else "no scale multiplication follows")
    return reasons
