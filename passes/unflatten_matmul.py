"""Reshape(MatMul(Reshape(x, [-1, K]), W) [+ b], x's leading dims + [N]) -> MatMul(x, W) [+ b]; also Gemm.

Why: GPT-2's Conv1D (and other ``addmm`` linears) flattens its input to rows, multiplies, and restores the
leading dims from ``x.size()[:-1]``. The restoring Reshape needs two symbolic dims (batch, seq) in its target,
which no constant target can say, so TVM's importer refuses it; and the flattening hides the rows from the
weight-matmul schedules. MatMul broadcasts over leading dims, so both Reshapes are redundant.

Proof, from shapes (canonicalize runs shape inference first): the inner Reshape's output is [rows, K] with K
the last dim of x; the outer one's output is x's leading dims (the same known integers or named symbols)
followed by N; the bias, if any, is 1-D or a scalar.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
from onnxscript.rewriter import pattern

from onnx_ir.passes.common import RemoveUnusedNodesPass, ShapeInferencePass

from kvc.passes.reshape_inferred_dim import forget_unknown_shapes, is_known, resolve_reshape_dims


def _flattened_rows(x: ir.Value, flat: ir.Value) -> bool:
    if x.shape is None or flat.shape is None or len(x.shape) < 3 or len(flat.shape) != 2:
        return False
    return isinstance(x.shape[-1], int) and flat.shape[1] == x.shape[-1]


def _restores_leading_dims(x: ir.Value, out: ir.Value) -> bool:
    if out.shape is None or len(out.shape) != len(x.shape):
        return False
    leading = list(zip(x.shape[:-1], out.shape[:-1]))
    return all(is_known(a) and is_known(b) and a == b for a, b in leading)


class UnflattenMatMul(pattern.RewriteRuleClassBase):
    with_bias = False

    def pattern(self, op, x, flat_shape, weight, out_shape):
        product = op.MatMul(op.Reshape(x, flat_shape, _outputs=["flat"]), weight)
        return op.Reshape(product, out_shape, _outputs=["out"])

    def check(self, context, x, weight, flat, out, bias=None, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        for reshape in (flat.producer(), out.producer()):
            if reshape.attributes.get_int("allowzero", 0):
                return result.fail("allowzero=1 Reshape")
        if weight.shape is None or len(weight.shape) != 2:
            return result.fail("weight is not a matrix")
        if self.with_bias and (bias.shape is None or len(bias.shape) > 1):
            return result.fail("bias is not 1-D")
        if not _flattened_rows(x, flat):
            return result.fail("the inner Reshape does not flatten x's leading dims to rows")
        if not _restores_leading_dims(x, out):
            return result.fail("the outer Reshape does not restore x's leading dims")
        return result

    def rewrite(self, op, x, weight, bias=None, **_):
        product = op.MatMul(x, weight)
        return op.Add(product, bias) if self.with_bias else product


class UnflattenMatMulBias(UnflattenMatMul):
    with_bias = True

    def pattern(self, op, x, flat_shape, weight, bias, out_shape):
        product = op.Add(op.MatMul(op.Reshape(x, flat_shape, _outputs=["flat"]), weight), bias)
        return op.Reshape(product, out_shape, _outputs=["out"])


class UnflattenGemm(UnflattenMatMul):
    """torch's ``addmm`` export: Gemm(rows, W, b) with no scaling or transposes."""
    with_bias = True

    def pattern(self, op, x, flat_shape, weight, bias, out_shape):
        product = op.Gemm(op.Reshape(x, flat_shape, _outputs=["flat"]), weight, bias, _allow_other_attributes=True,
                          _outputs=["gemm"])
        return op.Reshape(product, out_shape, _outputs=["out"])

    def check(self, context, gemm, **kwargs) -> pattern.MatchResult:
        node = gemm.producer()
        plain = {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0}
        for name, default in plain.items():
            attr = node.attributes.get(name)
            if attr is not None and attr.value != default:
                return pattern.MatchResult().fail(f"Gemm {name}={attr.value}")
        return super().check(context, **kwargs)


def unflatten_matmul_rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([UnflattenGemm.rule(), UnflattenMatMulBias.rule(), UnflattenMatMul.rule()])


@dataclass(frozen=True)
class ReshapeProofs:
    dims: int  # Reshape -1 dims proven
    chains: int  # flatten-MatMul-unflatten chains removed

    @property
    def notes(self) -> list[str]:
        if not (self.dims or self.chains):
            return []
        return [f"{self.dims} Reshape -1 dim(s) proven from the input's dims, {self.chains} flatten-MatMul-unflatten "
                f"chain(s) -> MatMul over the leading dims"]


def prove_reshapes(model: ir.Model) -> ReshapeProofs:
    """Reshape -1 dims proven by cancelling symbols (kvc.passes.reshape_inferred_dim) and flatten-MatMul-
    unflatten chains made MatMuls, each round followed by shape inference so what was proven reaches the
    shapes downstream, where it may prove the next; repeated while anything changes (bounded: each round fixes
    a dim or removes a chain for good)."""
    dims = chains = 0
    for _ in range(16):
        resolved = resolve_reshape_dims(model)
        unflattened = unflatten_matmul_rules().apply_to_model(model)
        if not resolved and not unflattened:
            break
        dims, chains = dims + resolved, chains + unflattened
        if unflattened:
            RemoveUnusedNodesPass()(model)
            forget_unknown_shapes(model.graph)
        ShapeInferencePass(data_prop=True)(model)
    return ReshapeProofs(dims, chains)
