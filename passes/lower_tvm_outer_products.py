"""TVM lowering: MatMul(a [..., M, 1], b [..., 1, N]) -> Mul(a, b).

Why: a sum of one product is the product, and broadcasting gives the same [..., M, N]; TVM's CPU GEMV schedule
(dlight) asserts on a matmul whose reduction has extent 1, so `kvc compile` ended in a traceback. HF's rotary
embedding computes inv_freq x positions this way when the RoPE fusion cannot read cos/sin from tables. Lowering
only: before fusion the attention patterns expect their MatMuls (ONNX's conformance cases have head size 1).
"""
from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from kvc.passes.base import KvcPass, PassReport


class OuterProductMatMul(pattern.RewriteRuleClassBase):

    def pattern(self, op, a, b):
        return op.MatMul(a, b)

    def check(self, context, a, b, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if a.shape is None or b.shape is None or len(a.shape) < 2 or len(b.shape) < 2:
            return result.fail("not two matrices of known rank")
        if a.shape[-1] != 1 or b.shape[-2] != 1:
            return result.fail("the reduction is not a single element")
        return result

    def rewrite(self, op, a, b, **_):
        return op.Mul(a, b)


class LowerTvmOuterProductsPass(KvcPass):
    name = "lower_tvm_outer_products"

    def apply(self, model: ir.Model) -> PassReport:
        report = PassReport(self.name)
        report.matched = pattern.RewriteRuleSet([OuterProductMatMul.rule()]).apply_to_model(model)
        return report
