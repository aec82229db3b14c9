"""Bring any exporter's graph into the form the fusion patterns expect.

0. optimum's merged decoder (``If(use_cache_branch)`` over a decoder without past inputs and one with):
   the with-past branch is kept (it also runs the prefill, on an empty past) and the input removed;
   the constant folding below inlines the branch;
1. upgrade the default opset to 23 (Attention, RotaryEmbedding, RMSNormalization exist from 23);
2. inline functions, then onnxscript's constant folding and no-op / cleanup rewrite rules
   (Identity, no-op Cast / Expand / Transpose / Slice, Cast-Cast, Transpose-Transpose,
   Reshape-Reshape, x+0, x*1, Dropout), dead code, constants lifted to initializers, CSE.
   That is onnxscript's ``optimize_ir`` minus its rules for convolutions and clips and minus
   SlicesSplit, whose multi-output pattern matching is quadratic in the node count (70 s on a
   24-layer model);
3. onnx shape inference with data propagation, so Reshape outputs get head counts and sizes;
4. fold ``Gather(Shape(x), i)`` and ``Slice(Shape(x), a, b)`` where those dimensions of x are known integers
   (the folder only folds whole static shapes; exporters compute head_dim / 2 and SDPA's default scale this
   way) and one-element ConstantOfShape (TorchScript's torch.full([], d ** 0.5)), then fold again;
5. Reshape -1 dims proven by cancelling the input's symbolic dims (kvc.passes.reshape_inferred_dim), and
   flatten-MatMul-unflatten chains (GPT-2's Conv1D) -> MatMul over the leading dims (kvc.passes.unflatten_matmul).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxscript.optimizer
from onnx_ir.passes import PassManager
from onnx_ir.passes.common import (CommonSubexpressionEliminationPass, IdentityEliminationPass, InlinePass,
                                   LiftConstantsToInitializersPass, RemoveUnusedNodesPass, ShapeInferencePass)
from onnxscript.rewriter import RewritePass, pattern
from onnxscript.rewriter.rules import common as rules
from onnxscript.version_converter import ConvertVersionPass

from kvc.contract import USE_CACHE_BRANCH
from kvc.passes._patterns import attr_int, const_array, const_ints, opset_version
from kvc.passes.base import KvcPass, PassReport
from kvc.passes.unflatten_matmul import prove_reshapes

TARGET_OPSET = 23
MIN_IR_VERSION = 10  # ONNX Runtime needs at least this to load opset-23 models


class StaticShapeGather(pattern.RewriteRuleClassBase):
    """Gather(Shape(x), i) -> Constant when x's dimension i is a known integer."""

    def __init__(self):
        super().__init__("StaticShapeGather", remove_nodes=False)  # the Shape may have other users

    def pattern(self, op, x, indices):
        shape = op.Shape(x, _allow_other_attributes=True, _outputs=["shape"])
        return op.Gather(shape, indices, _allow_other_attributes=True, _outputs=["gathered"])

    def check(self, context, x, indices, shape, gathered, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        self._dims = None
        idx = const_array(indices)
        if idx is None or attr_int(gathered.producer(), "axis", 0) != 0 or x.shape is None:
            return result.fail("indices or input shape unknown")
        node = shape.producer()
        dims = list(x.shape)[attr_int(node, "start", 0):attr_int(node, "end", x.shape.rank()) or None]
        try:
            picked = [dims[i] for i in idx.reshape(-1)]
        except IndexError:
            return result.fail("index out of range")
        if not all(isinstance(d, int) for d in picked):
            return result.fail("gathered dimensions are symbolic")
        self._dims = np.asarray(picked, dtype=np.int64).reshape(idx.shape)
        return result

    def rewrite(self, op, **_):
        return op.Constant(value=ir.tensor(self._dims))


class StaticShapeSlice(pattern.RewriteRuleClassBase):
    """Slice(Shape(x), starts, ends) -> Constant when the sliced dimensions of x are known integers
    (torch's SDPA export computes its default scale as 1 / sqrt(Shape(q)[-1:]) this way)."""

    def __init__(self):
        super().__init__("StaticShapeSlice", remove_nodes=False)  # the Shape may have other users

    def pattern(self, op, x, starts, ends):
        shape = op.Shape(x, _allow_other_attributes=True, _outputs=["shape"])
        return op.Slice(shape, starts, ends, _allow_other_inputs=True, _outputs=["sliced"])

    def check(self, context, x, starts, ends, shape, sliced, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        self._dims = None
        first, last = const_ints(starts), const_ints(ends)
        if first is None or last is None or len(first) != 1 or len(last) != 1 or x.shape is None:
            return result.fail("slice bounds or input shape unknown")
        axes_steps = list(sliced.producer().inputs[3:]) + [None, None]
        axes, steps = axes_steps[0], axes_steps[1]  # TorchScript writes axes [0] (and no steps)
        if (axes is not None and const_ints(axes) not in ([0], [-1])) or (steps is not None and const_ints(steps) != [1]):
            return result.fail("slice axes or steps are not the default")
        node = shape.producer()
        dims = list(x.shape)[attr_int(node, "start", 0):attr_int(node, "end", x.shape.rank()) or None]
        picked = dims[slice(first[0], last[0])]
        if not picked or not all(isinstance(d, int) for d in picked):
            return result.fail("sliced dimensions are symbolic")
        self._dims = np.asarray(picked, dtype=np.int64)
        return result

    def rewrite(self, op, **_):
        return op.Constant(value=ir.tensor(self._dims))


class SplitOffNothing(pattern.RewriteRuleClassBase):
    """Split(x, [n, 0]) on an axis of size n: the first part is x itself (ONNX's RotaryEmbedding
    function body splits off an empty "not rotated" part when the whole head is rotated)."""

    def __init__(self):
        super().__init__("SplitOffNothing", remove_nodes=False)

    def pattern(self, op, x, lengths):
        whole, _ = op.Split(x, lengths, _allow_other_attributes=True, _outputs=["whole", "nothing"])
        return whole

    def check(self, context, x, lengths, whole, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        parts, node = const_ints(lengths), whole.producer()
        axis = attr_int(node, "axis", 0)
        if parts is None or len(parts) != 2 or parts[1] != 0 or x.shape is None or len(node.outputs) != 2:
            return result.fail("not a split into everything and nothing")
        if x.shape[axis] != parts[0]:
            return result.fail("the first part is not the whole axis")
        return result

    def rewrite(self, op, x, **_):
        return op.Identity(x)  # the Split stays while its empty part has users


class SmallConstantOfShape(pattern.RewriteRuleClassBase):
    """ConstantOfShape(constant shape) of one element -> Constant. onnxscript's folder leaves every
    ConstantOfShape; TorchScript writes torch.full([], d ** 0.5), GPT-2's score divisor in transformers 4.4x, as
    ConstantOfShape([]) + d ** 0.5, which must fold for the attention's scale to be a constant. (Larger ones stay:
    folding ONNX's expanded Attention's zero bias would fold its row guard into a form the fusion does not know.)"""

    _MAX_ELEMENTS = 1

    def __init__(self):
        super().__init__("SmallConstantOfShape", remove_nodes=False)

    def pattern(self, op, shape):
        return op.ConstantOfShape(shape, _allow_other_attributes=True, _outputs=["filled"])

    def check(self, context, shape, filled, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        dims = const_ints(shape)
        if dims is None or any(d < 0 for d in dims) or int(np.prod(dims)) > self._MAX_ELEMENTS:
            return result.fail("shape not a small constant")
        attribute = filled.producer().attributes.get("value")
        fill = attribute.as_tensor().numpy().reshape(-1) if attribute is not None else np.zeros(1, np.float32)
        self._filled = np.full(dims, fill[0], dtype=fill.dtype)
        return result

    def rewrite(self, op, **_):
        return op.Constant(value=ir.tensor(self._filled))


def _static_shape_rules() -> pattern.RewriteRuleSet:
    """Built per run: StaticShapeGather keeps its match's dims between check and rewrite."""
    return pattern.RewriteRuleSet([StaticShapeGather.rule(), StaticShapeSlice.rule(), SplitOffNothing.rule(),
                                   SmallConstantOfShape.rule()])


_CLEANUP_RULES = pattern.RewriteRuleSet([
    rules.add_0_rule, rules.sub_0_rule, rules.mul_by_1_rule, rules.div_by_1_rule, rules.dropout_inference_rule,
    rules.dropout_zero_rule, rules.no_op_cast_rule, rules.cast_cast_rule, rules.no_op_expand_rule,
    rules.no_op_transpose_rule, rules.transpose_transpose_rule, rules.reshape_reshape_rule,
    rules.unsqueeze_unsqueeze_rule, rules.squeeze_reshape_1d_rule, rules.materialize_reshape_shape_rule,
    rules.collapse_slice_rule, rules.collapse_slice2_rule])


def _fold_and_clean(model: ir.Model) -> None:
    PassManager([
        InlinePass(),
        PassManager([_FoldConstants(), RewritePass(_CLEANUP_RULES), IdentityEliminationPass(),
                     RemoveUnusedNodesPass()], steps=2, early_stop=True),
        LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        CommonSubexpressionEliminationPass(),
    ])(model)


class _FoldConstants(ir.passes.InPlacePass):
    """onnxscript's constant folding (with node-level shape inference) as a pass."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        folded = onnxscript.optimizer.fold_constants(model, onnx_shape_inference=True)
        return ir.passes.PassResult(model, folded.modified)


class CanonicalizePass(KvcPass):
    name = "canonicalize"

    def apply(self, model: ir.Model) -> PassReport:
        report = PassReport(self.name)
        nodes_before = sum(1 for _ in model.graph)
        selected = _take_cache_branch(model, report)
        _upgrade_opset(model, report)
        _fold_and_clean(model)
        _release_dropped_branches(selected)
        ShapeInferencePass(data_prop=True)(model)
        if _static_shape_rules().apply_to_model(model):
            # Fold the arithmetic on the new constants (head_dim / 2, ...), then drop what it fed.
            onnxscript.optimizer.fold_constants(model)
            RemoveUnusedNodesPass()(model)
            LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
            ShapeInferencePass(data_prop=True)(model)
        proofs = prove_reshapes(model)
        report.notes += proofs.notes
        report.modified = report.modified or bool(proofs.notes)
        if model.ir_version < MIN_IR_VERSION:
            model.ir_version, report.modified = MIN_IR_VERSION, True
        nodes_after = sum(1 for _ in model.graph)
        report.matched = max(nodes_before - nodes_after, 0)
        report.notes.append(f"{nodes_before} nodes -> {nodes_after} nodes")
        return report


def _take_cache_branch(model: ir.Model, report: PassReport) -> list[ir.Node]:
    """Feed optimum's ``use_cache_branch`` a constant true: the If it selects folds to its with-past branch.
    Returns the If nodes it selects on."""
    flag = next((v for v in model.graph.inputs if v.name == USE_CACHE_BRANCH), None)
    if flag is None or flag.dtype != ir.DataType.BOOL:
        return []
    selected = [node for node, index in flag.uses() if node.op_type == "If" and index == 0]
    true = ir.Value(name=f"{USE_CACHE_BRANCH}_true", const_value=ir.tensor(np.array([True])))
    model.graph.register_initializer(true)
    flag.replace_all_uses_with(true)
    model.graph.inputs.remove(flag)
    report.notes.append(f"{USE_CACHE_BRANCH}: the with-past branch is kept")
    report.modified = True
    return selected


def _release_dropped_branches(selected: list[ir.Node]) -> None:
    """The folded If's else branch still reads the outer graph's values (attention_mask, the pasts): its nodes
    stay registered as their users, which later passes would count. Detach them once the If is gone."""
    for node in selected:
        if node.graph is not None:
            continue  # not folded: the graph keeps the If, and its branches stay as they are
        dropped = node.attributes["else_branch"].as_graph()
        for inner in ir.traversal.RecursiveGraphIterator(dropped):
            for index in range(len(inner.inputs)):
                inner.replace_input_with(index, None)


def _upgrade_opset(model: ir.Model, report: PassReport) -> None:
    before = opset_version(model)
    if before >= TARGET_OPSET:
        return
    try:
        ConvertVersionPass(TARGET_OPSET, fallback=True)(model)
    except Exception as e:  # the converters raise assorted errors; the graph is left as it was
        report.notes.append(f"opset {before} could not be upgraded to {TARGET_OPSET}: {e}")
        return
    after = opset_version(model)
    if after < TARGET_OPSET:
        report.notes.append(f"opset {before} could not be upgraded to {TARGET_OPSET}; fused ops unavailable")
    else:
        report.notes.append(f"opset {before} -> {after}")
    report.modified = after > before
