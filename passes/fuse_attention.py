"""Unfused scaled-dot-product attention (+ GQA head expansion, + past concat) -> opset-23 Attention.

Shape legend for value names: B batch, H query heads, K kv heads, S query length, P past length,
T total key length (P + S), D head size, Dv value head size.

Two rules, applied in order:

1. ``AttentionCoreFusion``: MatMul(Q, K^T) -> scale (Mul/Div on scores, or sqrt-scale on Q and
   K^T as torch's SDPA decomposition does) -> softcap (Div, Tanh, Mul) -> additive mask (Add)
   -> Softmax (optionally between Casts) -> fully-masked-row guard (Where) -> MatMul with V
   becomes ``Attention(Q, K, V, mask, scale=...)``. K and V are traced back through
   data-movement ops (transpose, GQA repeat_kv via Expand+Reshape / Tile / Gather) to the
   tensors [B, K, T, D] the exporter started from; a probe on sample data checks that the
   chain really is "repeat each kv head H/K times" (plus the key transpose).
2. ``AttentionPastFusion``: Attention(Q, Concat(past_key, k), Concat(past_value, v), mask)
   becomes ``Attention(Q, k, v, mask, past_key, past_value) -> (Y, present_key, present_value)``,
   the present outputs taking over the Concat outputs (graph outputs present.N.* included).
   The KV ring-buffer pass relies on exactly this form.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass, TopologicalSortPass
from onnxscript.rewriter import pattern

from kvc.errors import GraphError
from kvc.passes._patterns import (FLOAT_TYPES, ProbeError, SampleDims, attr_int, const_ints, const_scalar,
                                  downstream_nodes, explain_no_match, rank, run_slice,
                                  sample_like, static_dim, summarize)
from kvc.passes.attention_shape_reads import (ShapeReadError, ancestors, describe, detach_shape_reads,
                                              upstream_users)
from kvc.passes.base import KvcPass, PassReport

MIN_OPSET = 23
# Ops that only move or repeat data: K/V are traced back through these to find their source.
_DATA_MOVEMENT = frozenset({"Transpose", "Reshape", "Expand", "Unsqueeze", "Squeeze", "Tile", "Identity",
                            "Flatten", "Gather"})
_MAX_CHAIN = 12


@dataclass
class _Plan:
    key: ir.Value
    value: ir.Value
    scale: float
    softcap: float | None
    softmax_precision: int | None
    exposed: ir.Value | None  # an intermediate the graph also outputs: becomes qk_matmul_output
    exposed_mode: int | None


class AttentionCoreFusion(pattern.RewriteRuleClassBase):
    def __init__(self):
        # Nodes stay until dead-code removal: intermediates may have other users (qk outputs).
        super().__init__("AttentionCore", remove_nodes=False)
        self._rewires: list[tuple[ir.Value, ir.Value]] = []

    def pattern(self, op, query_BHSD, key_t_BHDT, value_BHTDv, mask, select, fill, q_scale, k_scale, qk_scale,
                cap_in, cap_out, max_axes, neg_inf, zero, softmax_dtype, probs_dtype):
        q = pattern.OrValue([op.Mul(query_BHSD, q_scale), op.Div(query_BHSD, q_scale), query_BHSD],
                            tag_var="q_scaling", tag_values=["Mul", "Div", None])
        k = pattern.OrValue([op.Mul(key_t_BHDT, k_scale), op.Div(key_t_BHDT, k_scale), key_t_BHDT],
                            tag_var="k_scaling", tag_values=["Mul", "Div", None])
        qk = op.MatMul(q, k, _outputs=["qk_BHST"])
        scaled = pattern.OrValue([op.Mul(qk, qk_scale, _outputs=["scaled_BHST"]),
                                  op.Div(qk, qk_scale, _outputs=["scaled_BHST"]), qk],
                                 tag_var="qk_scaling", tag_values=["Mul", "Div", None])
        capped = pattern.OrValue([op.Mul(op.Tanh(op.Div(scaled, cap_in)), cap_out, _outputs=["capped_BHST"]), scaled],
                                 tag_var="has_softcap", tag_values=[True, False])
        # A boolean mask selects the scores or a large negative fill (GPT-2's causal bias, masked_fill).
        kept = pattern.OrValue([op.Where(select, capped, fill, _outputs=["kept_BHST"]),
                                op.Where(select, fill, capped, _outputs=["kept_BHST"]), capped],
                               tag_var="select_keeps", tag_values=[True, False, None])
        masked = pattern.OrValue([op.Add(kept, mask, _outputs=["masked_BHST"]),
                                  op.Add(mask, kept, _outputs=["masked_BHST"]), kept],
                                 tag_var="has_mask", tag_values=[True, True, False])
        logits = pattern.OrValue([op.Cast(masked, to=softmax_dtype), masked],
                                 tag_var="softmax_cast", tag_values=[True, False])
        probs = op.Softmax(logits, _allow_other_attributes=True, _outputs=["softmax_BHST"])
        probs = pattern.OrValue([op.Cast(probs, to=probs_dtype), probs])
        row_max = op.ReduceMax(mask, max_axes, _allow_other_attributes=True, _outputs=["row_max"])
        row_all_masked = op.Equal(row_max, neg_inf)
        probs = pattern.OrValue([op.Where(row_all_masked, zero, probs), op.Where(op.IsNaN(probs), zero, probs), probs],
                                tag_var="guard", tag_values=["row_max", "nan", None])
        return op.MatMul(probs, value_BHTDv, _outputs=["attn_BHSDv"])

    def check(self, context, query_BHSD, key_t_BHDT, value_BHTDv, mask, softmax_BHST, attn_BHSDv,
              **b) -> pattern.MatchResult:
        result = pattern.MatchResult()
        q_heads, head_size = _heads_and_size(query_BHSD, key_t_BHDT, b["qk_BHST"])
        if rank(query_BHSD) not in (4, None) or q_heads is None or head_size is None:
            return result.fail("query is not a 4-D [batch, heads, seq, head_size] tensor with known heads and size")
        if query_BHSD.dtype not in FLOAT_TYPES:
            return result.fail("query is not a float tensor")
        if attn_BHSDv.dtype is not None and attn_BHSDv.dtype != query_BHSD.dtype:
            return result.fail("the output is not in the query's dtype (softmax cast back to another type)")
        axis = attr_int(softmax_BHST.producer(), "axis", -1)
        if axis not in (-1, 3):
            return result.fail(f"Softmax axis {axis} is not the key axis")
        scale = _scale(b)
        if scale is None:
            return result.fail("scale factors are not constant scalars")
        softcap = _softcap(b)
        if b.get("has_softcap") and softcap is None:
            return result.fail("softcap divisor and multiplier are not the same positive constant")
        reason = (_mask_problem(b.get("has_mask"), mask, query_BHSD) or _guard_problem(b, mask)
                  or _select_problem(b, query_BHSD))
        if reason:
            return result.fail(reason)
        try:
            opsets = dict(context.graph_or_function.opset_imports)
            key = find_kv_source(key_t_BHDT, q_heads=q_heads, head_size=head_size, transposed=True, opsets=opsets)
            value = find_kv_source(value_BHTDv, q_heads=q_heads, head_size=None, transposed=False, opsets=opsets)
        except ProbeError as e:
            return result.fail(str(e))
        if static_dim(key, 1) != static_dim(value, 1):
            return result.fail("key and value have different numbers of heads")
        exposed, mode = _exposed_intermediate(list(context.nodes), b, attn_BHSDv)
        if exposed is not None and mode is None:
            return result.fail("an intermediate score tensor is also used elsewhere and has no "
                               "qk_matmul_output_mode equivalent")
        if exposed is not None:
            blocking = upstream_users(exposed, ancestors([query_BHSD, key, value, mask if b.get("has_mask") else None]))
            if blocking:
                return result.fail(f"{describe(blocking)} read the scores {exposed.name!r} and feed the attention's "
                                   "own inputs: exposing them as qk_matmul_output would make a cycle")
        sm_dtype = b.get("softmax_dtype")
        self._plan = _Plan(key, value, scale, softcap, sm_dtype.as_int() if b.get("softmax_cast") else None,
                           exposed, mode)
        return result

    def rewrite(self, op, query_BHSD, mask, has_mask=None, select=None, fill=None, select_keeps=None, **_):
        plan = self._plan
        if select_keeps is not None:  # the selection becomes an additive mask: 0 where kept, the fill elsewhere
            zero = op.CastLike(op.Constant(value_float=0.0), fill)
            selected = op.Where(select, zero, fill) if select_keeps else op.Where(select, fill, zero)
            mask = op.Add(selected, mask) if has_mask else selected
            has_mask = True
        attrs = {"scale": plan.scale}
        if plan.softcap is not None:
            attrs["softcap"] = plan.softcap
        if plan.softmax_precision is not None:
            attrs["softmax_precision"] = plan.softmax_precision
        inputs = [query_BHSD, plan.key, plan.value, mask if has_mask else None]
        if plan.exposed is None:
            return op.Attention(*inputs, **attrs)
        outputs = op.Attention(*inputs, **attrs, qk_matmul_output_mode=plan.exposed_mode, _outputs=4)
        self._rewires.append((plan.exposed, outputs[3]))
        return outputs[0]

    def setup(self):
        self._rewires = []

    def cleanup(self):
        # qk_matmul_output takes over the intermediate the graph exposed (after all rewrites,
        # so the matcher never sees half-rewired graphs).
        for old, new in self._rewires:
            take_over(old, new)
        self._rewires = []


class AttentionPastFusion(pattern.RewriteRuleClassBase):
    """Fold Concat(past, new) on K and V into Attention's past inputs and present outputs."""

    def __init__(self, with_qk_output: bool):
        super().__init__(f"AttentionPast{'WithQk' if with_qk_output else ''}")
        self._with_qk = with_qk_output

    def pattern(self, op, query_BHSD, past_key_BKPD, key_BKSD, past_value_BKPD, value_BKSDv, key_axis, value_axis):
        present_key_BKTD = op.Concat(past_key_BKPD, key_BKSD, axis=key_axis, _outputs=["present_key_BKTD"])
        present_value_BKTDv = op.Concat(past_value_BKPD, value_BKSDv, axis=value_axis,
                                        _outputs=["present_value_BKTDv"])
        outputs = ["attn_BHSDv", "unused_key", "unused_value", "qk_BHST"] if self._with_qk else ["attn_BHSDv"]
        result = op.Attention(query_BHSD, present_key_BKTD, present_value_BKTDv,
                              pattern.Var("mask", can_match_none=True), _allow_other_attributes=True,
                              _outputs=outputs)
        if self._with_qk:
            return result[0], present_key_BKTD, present_value_BKTDv, result[3]
        return result, present_key_BKTD, present_value_BKTDv

    def check(self, context, past_key_BKPD, key_BKSD, past_value_BKPD, value_BKSDv, key_axis, value_axis,
              present_key_BKTD, present_value_BKTDv, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if len(context.root.outputs) != (4 if self._with_qk else 1):
            # (onnxscript's matcher accepts a node with fewer outputs than the pattern names)
            return result.fail("Attention node has a different number of outputs")
        if key_axis.as_int() not in (2, -2) or value_axis.as_int() not in (2, -2):
            return result.fail("past and new keys/values are not concatenated on the sequence axis")
        if any(rank(v) not in (4, None) for v in (past_key_BKPD, key_BKSD, past_value_BKPD, value_BKSDv)):
            return result.fail("past or new key/value is not 4-D")
        upstream = ancestors(context.root.inputs)
        for present in (present_key_BKTD, present_value_BKTDv):
            blocking = upstream_users(present, upstream)
            if blocking:
                return result.fail(f"{describe(blocking)} read the concatenated cache {present.name!r} and feed "
                                   f"Attention node {context.root.name!r}: folding the Concat into it would make a "
                                   "cycle")
        return result

    def rewrite(self, op, query_BHSD, past_key_BKPD, key_BKSD, past_value_BKPD, value_BKSDv, mask, attn_BHSDv,
                **_):
        attrs = {name: attr for name, attr in attn_BHSDv.producer().attributes.items()}
        outputs = op.Attention(query_BHSD, key_BKSD, value_BKSDv, mask, past_key_BKPD, past_value_BKPD,
                               **attrs, _outputs=4 if self._with_qk else 3)
        return outputs if self._with_qk else outputs[:3]


def core_rules() -> pattern.RewriteRuleSet:
    """Built per run: the rule keeps its match's plan between check and rewrite."""
    return pattern.RewriteRuleSet([AttentionCoreFusion.rule()])


def past_rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([AttentionPastFusion.rule(with_qk_output=True),
                                   AttentionPastFusion.rule(with_qk_output=False)])


class FuseAttentionPass(KvcPass):
    name = "attention"
    min_opset = MIN_OPSET

    def apply(self, model: ir.Model) -> PassReport:
        report = PassReport(self.name)
        ShapeInferencePass(data_prop=True)(model)  # earlier fusions left new values without shapes
        report.matched = core_rules().apply_to_model(model)
        with_past = 0
        if report.matched:
            report.notes.extend(_detach_cache_shape_reads(model))
            with_past = past_rules().apply_to_model(model)
        try:
            TopologicalSortPass()(model)  # present outputs now come from nodes later in the graph
        except ValueError as e:  # every re-pointing above is checked for cycles: this is a bug, not the user's
            raise GraphError(f"the attention fusion left a cycle in the graph ({e}); please report this graph "
                             "(kvc compile --dump-passes DIR writes the graph it started from)") from None
        if report.matched:
            report.notes.append(f"{with_past} of {report.matched} take past_key/past_value")
        report.notes.extend(summarize(self.name, "Softmax nodes", _leftover_reasons(model)))
        return report


def _detach_cache_shape_reads(model: ir.Model) -> list[str]:
    """Shape reads of Concat(past, new) caches that the Attention's own inputs depend on (the mask crop of
    transformers' sdpa/eager attention) are computed from the Concat's inputs instead, so the past fusion can
    fold the Concat without a cycle. Returns notes for the caches it could not detach."""
    notes = []
    opsets = dict(model.graph.opset_imports)
    attentions = [n for n in model.graph if n.op_type == "Attention" and n.domain == "" and len(n.inputs) <= 4]
    for attention in attentions:
        for cache in attention.inputs[1:3]:
            concat = cache.producer() if cache is not None else None
            if concat is None or concat.op_type != "Concat" or len(concat.inputs) != 2:
                continue
            try:
                count = detach_shape_reads(concat, attention, opsets)
            except ShapeReadError as e:
                notes.append(f"attention: Attention node {attention.name!r} keeps its Concat cache: {e}")
                continue
            if count:
                notes.append(f"{count} shape reads of {cache.name!r} feeding {attention.name!r} now read the past "
                             "and new keys/values")
    return notes


# --- key / value sources ---------------------------------------------------------------------------

def find_kv_source(used: ir.Value, *, q_heads: int, head_size: int | None, transposed: bool,
                   opsets: dict[str, int]) -> ir.Value:
    """The [B, K, T, D] tensor that ``used`` repeats per query-head group (and transposes for keys).

    Walks up through data-movement ops and takes the furthest value for which a probe on
    sample data confirms ``used == repeat(source, H/K, axis=1)`` (``.swapaxes(-1, -2)`` for keys).
    """
    chain = [used]
    while len(chain) < _MAX_CHAIN:
        node = chain[-1].producer()
        if node is None or node.op_type not in _DATA_MOVEMENT or node.domain != "" or not node.inputs:
            break
        chain.append(node.inputs[0])
    problems = []
    for candidate in reversed(chain):
        heads = static_dim(candidate, 1)
        if rank(candidate) != 4 or heads is None or q_heads % heads:
            continue
        if head_size is not None and static_dim(candidate, 3) != head_size:
            continue
        try:
            if _repeats_heads(candidate, used, q_heads // heads, transposed, opsets):
                return candidate
        except ProbeError as e:
            problems.append(str(e))
    what = "key" if transposed else "value"
    detail = f": {problems[0]}" if problems else ""
    raise ProbeError(f"{what} is not a [batch, kv_heads, seq, head_size] tensor repeated per head group "
                     f"(head h must read kv head h // group){detail}")


def _repeats_heads(source: ir.Value, used: ir.Value, group: int, transposed: bool, opsets: dict[str, int]) -> bool:
    dims = SampleDims()
    sample = sample_like(source, dims, np.random.default_rng(0))
    (got,) = run_slice([used], {source: sample}, opsets, dims)
    want = np.repeat(sample, group, axis=1)
    if transposed:
        want = np.swapaxes(want, -1, -2)
    return got.shape == want.shape and np.array_equal(got, want)


# --- checks ----------------------------------------------------------------------------------------

def _heads_and_size(query: ir.Value, key_t: ir.Value, scores: ir.Value) -> tuple[int | None, int | None]:
    """Query heads and head size; exporters that reshape with -1 leave them to the key side."""
    heads = static_dim(query, 1)
    if heads is None and rank(key_t) == 4:
        heads = static_dim(key_t, 1) or static_dim(scores, 1)
    size = static_dim(query, 3)
    if size is None and rank(key_t) == 4:
        size = static_dim(key_t, 2)
    return heads, size


def _scale(b: dict) -> float | None:
    scale = 1.0
    for tag, var in (("q_scaling", "q_scale"), ("k_scaling", "k_scale"), ("qk_scaling", "qk_scale")):
        kind = b.get(tag)
        if kind is None:
            continue
        factor = const_scalar(b.get(var))
        if factor is None or factor == 0:
            return None
        scale *= factor if kind == "Mul" else 1.0 / factor
    return scale


def _softcap(b: dict) -> float | None:
    if not b.get("has_softcap"):
        return None
    cap_in, cap_out = const_scalar(b.get("cap_in")), const_scalar(b.get("cap_out"))
    if cap_in is None or cap_in <= 0 or not math.isclose(cap_in, cap_out or 0.0, rel_tol=1e-6):
        return None
    return cap_in


def _mask_problem(has_mask, mask: ir.Value | None, query: ir.Value) -> str | None:
    if not has_mask:
        return None
    if mask.dtype is not None and mask.dtype != query.dtype:
        return f"mask dtype {mask.dtype} differs from query dtype {query.dtype}"
    if mask.shape is None:
        return "mask shape unknown"
    if mask.shape.rank() > 4:
        return "mask shape not broadcastable to [batch, heads, seq, total_seq]"
    heads = static_dim(query, 1)
    if mask.shape.rank() >= 3 and isinstance(mask.shape[-3], int) and mask.shape[-3] not in (1, heads):
        return "mask shape not broadcastable to [batch, heads, seq, total_seq]"
    return None


# Scores replaced by this fill (or lower) get exp(fill - row max) == 0 in float32 softmax whether or not the score
# is added to it, so Where(select, scores, fill) equals scores + Where(select, 0, fill) after Softmax.
_MAX_SELECT_FILL = -1e4


def _select_problem(b: dict, query: ir.Value) -> str | None:
    if b.get("select_keeps") is None:
        return None
    select, fill = b["select"], b["fill"]
    if select.dtype not in (ir.DataType.BOOL, None):
        return "the score selection's condition is not boolean"
    if rank(select) is None or rank(select) > 4:
        return "the score selection's condition is not broadcastable to [batch, heads, seq, total_seq]"
    value = const_scalar(fill)
    if value is None or value > _MAX_SELECT_FILL or (fill.dtype is not None and fill.dtype != query.dtype):
        return f"the score selection's fill is not a constant of the query's dtype at most {_MAX_SELECT_FILL:g}"
    return None


def _guard_problem(b: dict, mask: ir.Value | None) -> str | None:
    """The fully-masked-row guard must zero rows whose mask is -inf everywhere (as Attention does)."""
    guard = b.get("guard")
    if guard is None:
        return None
    if const_scalar(b.get("zero")) != 0.0:
        return "the row guard does not write zeros"
    if guard == "nan":
        return None
    if not b.get("has_mask"):
        return "the row guard reads a mask that is not added to the scores"
    axes = const_ints(b.get("max_axes"))
    if axes not in ([-1], [rank(mask) - 1]) or attr_int(b["row_max"].producer(), "keepdims", 1) != 1:
        return "the row guard does not reduce over the key axis"
    if const_scalar(b.get("neg_inf")) != -math.inf:
        return "the row guard does not compare with -inf"
    return None


def _exposed_intermediate(matched: list[ir.Node], b: dict, attn: ir.Value) -> tuple[ir.Value | None, int | None]:
    """An intermediate score tensor used outside the match, and its qk_matmul_output_mode."""
    inside = set(matched)
    scaled = b.get("scaled_BHST") if b.get("scaled_BHST") is not None else b["qk_BHST"]
    stages = [(scaled, 0), (b.get("capped_BHST"), 1), (b.get("masked_BHST"), 2), (attn.producer().inputs[0], 3)]
    stage_of = {value: mode for value, mode in reversed(stages) if value is not None}
    for node in matched:
        for value in node.outputs:
            if value is attn or not (value.is_graph_output() or any(u not in inside for u, _ in value.uses())):
                continue
            return value, stage_of.get(value)
    return None, None


def take_over(old: ir.Value, new: ir.Value) -> None:
    """``new`` replaces ``old`` everywhere, keeping its name when ``old`` is a graph output."""
    name, shape, type_ = old.name, old.shape, old.type
    was_output = old.is_graph_output()
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    if was_output:
        old.name = None
        new.name = name
    new.shape, new.type = shape, type_


def _leftover_reasons(model: ir.Model) -> list[str]:
    reasons = []
    for node in model.graph:
        if node.op_type != "Softmax":
            continue
        anchors = [n for n in downstream_nodes(node, 3) if n.op_type == "MatMul"]
        if not anchors:
            reasons.append("its output does not feed a MatMul with values (not attention)")
        else:
            reasons.append(explain_no_match(core_rules().rules, model, anchors))
    return reasons
