"""ONNX ``Attention`` (opset 23, 24, 25) -> Relax, following onnx.reference's ``_compute_attention``.

Covers 3-D ([B, S, H*D] with q_num_heads/kv_num_heads) and 4-D ([B, H, S, D]) inputs, GQA (kv head
h // G serves query head h), bool or additive ``attn_mask`` (shorter masks padded as masked),
``is_causal`` aligned bottom-right, past_key/past_value concatenated into present_key/present_value,
``nonpad_kv_seqlen`` (per-batch valid keys of an external cache), ``scale``, ``softcap``, the
opset-25 windows, every ``qk_matmul_output_mode`` and ``softmax_precision``. A query row with no
visible key gives zeros, as the reference does. Batch and sequence dims may be symbolic.

Legend: B batch, H query heads, K kv heads, G = H / K, S query length, T key length, D head size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from tvm import relax
from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

from kvc.compiler.tvm.converters.common import (
    NEG_INF,
    dtype_of,
    onnx_dtype_name,
    outputs,
    scalar,
    shape_of,
    simplify_dim,
    static_dim,
)
from kvc.errors import GraphError

OP = "Attention"
op = relax.op


@dataclass(frozen=True)
class AttentionAttrs:
    scale: float | None
    is_causal: bool
    q_num_heads: int | None
    kv_num_heads: int | None
    softcap: float
    qk_matmul_output_mode: int
    softmax_dtype: str | None
    left_window: int
    right_window: int

    @classmethod
    def parse(cls, attr: dict) -> AttentionAttrs:
        mode = attr.get("qk_matmul_output_mode", 0)
        if mode not in (0, 1, 2, 3):
            raise GraphError(f"{OP}: qk_matmul_output_mode={mode} is not defined by ONNX (0..3)")
        precision = attr.get("softmax_precision")
        return cls(scale=attr.get("scale"), is_causal=bool(attr.get("is_causal", 0)),
                   q_num_heads=attr.get("q_num_heads"), kv_num_heads=attr.get("kv_num_heads"),
                   softcap=float(attr.get("softcap", 0.0)), qk_matmul_output_mode=mode,
                   softmax_dtype=onnx_dtype_name(precision) if precision else None,
                   left_window=attr.get("left_window_size", -1), right_window=attr.get("right_window_size", -1))

    @property
    def has_window(self) -> bool:
        return self.left_window >= 0 or self.right_window >= 0


@dataclass(frozen=True)
class AttentionInputs:
    q_BHSD: relax.Expr
    k_BKTD: relax.Expr  # the new keys, before past_key is prepended
    v_BKTD: relax.Expr
    mask: relax.Expr | None
    past_key: relax.Expr | None
    past_value: relax.Expr | None
    nonpad_B: relax.Expr | None


class Attention(OnnxOpConverter):
    """The standard-domain Attention; opsets 24 and 25 only add optional inputs and attributes."""

    @classmethod
    def _impl_v23(cls, bb, inputs, attr, params):
        attrs = AttentionAttrs.parse(attr)
        q, k, v = inputs[0], inputs[1], inputs[2]
        rank = len(shape_of(q, OP))
        if rank == 3:
            if attrs.q_num_heads is None or attrs.kv_num_heads is None:
                raise GraphError(f"{OP}: 3-D inputs need the q_num_heads and kv_num_heads attributes")
            q, k, v = (_split_heads(bb, x, n) for x, n in
                       ((q, attrs.q_num_heads), (k, attrs.kv_num_heads), (v, attrs.kv_num_heads)))
        elif rank != 4:
            raise GraphError(f"{OP}: Q must be 3-D or 4-D, got rank {rank}")
        past_key, past_value = inputs[4], inputs[5]
        if (past_key is None) != (past_value is None):
            raise GraphError(f"{OP}: past_key and past_value must be given together")
        nonpad = inputs[6]
        if nonpad is not None and past_key is not None:
            raise GraphError(f"{OP}: nonpad_kv_seqlen cannot be combined with past_key/past_value")
        ins = AttentionInputs(q, k, v, inputs[3], past_key, past_value, nonpad)
        y, present_key, present_value, qk = lower_attention(bb, ins, attrs)
        if rank == 3:
            y = _merge_heads(bb, y)
        return outputs([y, present_key, present_value, qk], attr)


def lower_attention(bb: relax.BlockBuilder, ins: AttentionInputs, attrs: AttentionAttrs):
    """4-D attention; returns (Y, present_key, present_value, qk_matmul_output)."""
    dtype = dtype_of(ins.q_BHSD)
    batch, heads, q_len, head_dim = shape_of(ins.q_BHSD, OP)
    kv_heads = shape_of(ins.k_BKTD, OP)[1]
    groups = _group_size(heads, kv_heads)
    k_BKTD, v_BKTD = ins.k_BKTD, ins.v_BKTD
    past_len = 0
    if ins.past_key is not None:
        past_len = shape_of(ins.past_key, OP)[2]
        k_BKTD = bb.emit(op.concat([ins.past_key, k_BKTD], axis=2))
        v_BKTD = bb.emit(op.concat([ins.past_value, v_BKTD], axis=2))
    kv_len = shape_of(k_BKTD, OP)[2]

    scale = attrs.scale if attrs.scale is not None else 1.0 / math.sqrt(static_dim(head_dim, OP, "the head size"))
    q_scaled = op.multiply(ins.q_BHSD, scalar(scale, dtype))
    scores_BHST = _grouped_matmul(bb, q_scaled, op.permute_dims(k_BKTD, [0, 1, 3, 2]), groups)
    if attrs.softcap > 0:
        cap = scalar(attrs.softcap, dtype)
        scores_BHST = bb.emit(op.multiply(op.tanh(op.divide(scores_BHST, cap)), cap))

    bias = _attention_bias(bb, ins, past_len, q_len, kv_len, attrs, dtype)
    if bias is not None:
        bias = _aligned_to(bb, bias, shape_of(scores_BHST, OP))
    biased = scores_BHST if bias is None else bb.emit(op.add(scores_BHST, bias))
    probs = _softmax(bb, biased, attrs.softmax_dtype)
    if bias is not None:  # a row with no visible key attends to nothing (the reference's guard)
        probs = bb.emit(op.where(_no_visible_key(bias, dtype), scalar(0, dtype_of(probs)), probs))
    qk_out = {0: scores_BHST, 1: scores_BHST, 2: biased, 3: probs}[attrs.qk_matmul_output_mode]
    probs = op.astype(probs, dtype) if dtype_of(probs) != dtype else probs
    y = _grouped_matmul(bb, probs, v_BKTD, groups)
    return y, k_BKTD, v_BKTD, op.astype(qk_out, dtype) if dtype_of(qk_out) != dtype else qk_out


def _aligned_to(bb, bias: relax.Expr, scores_dims: list) -> relax.Expr:
    """bias, typed so that every non-1 dim is the scores' dim. A mask computed in-graph (e.g. from
    Range) has dims TVM cannot relate to Q's and K's; broadcasting requires them equal, which
    match_cast checks at run time."""
    dims = shape_of(bias, OP)
    offset = len(scores_dims) - len(dims)
    wanted = [d if isinstance(d, int) and d == 1 else scores_dims[offset + i] for i, d in enumerate(dims)]
    if all(_same_dim(a, b) for a, b in zip(dims, wanted)):
        return bias
    return bb.match_cast(bias, relax.TensorType(wanted, dtype_of(bias)))


def _same_dim(a, b) -> bool:
    if isinstance(a, int) or isinstance(b, int):
        return a == b if isinstance(a, int) and isinstance(b, int) else False
    return a.same_as(b)


def _no_visible_key(bias: relax.Expr, dtype: str) -> relax.Expr:
    """Rows whose bias is -inf everywhere. Counted, not max-reduced: TVM's max starts from the lowest
    finite value, so max over all -inf is not -inf."""
    visible = op.astype(op.greater(bias, scalar(NEG_INF, dtype)), "int32")
    return op.equal(op.sum(visible, axis=-1, keepdims=True), relax.const(0, "int32"))


def _group_size(heads, kv_heads) -> int:
    heads = static_dim(heads, OP, "the number of query heads")
    kv_heads = static_dim(kv_heads, OP, "the number of kv heads")
    if heads % kv_heads:
        raise GraphError(f"{OP}: {heads} query heads are not a multiple of {kv_heads} kv heads")
    return heads // kv_heads


def _grouped_matmul(bb, a_BHMX, b_BKXN, groups: int) -> relax.Expr:
    """a @ b where query head h uses kv head h // groups, without repeating b."""
    if groups == 1:
        return bb.emit(op.matmul(a_BHMX, b_BKXN))
    a_BHMX = bb.normalize(a_BHMX)
    batch, heads, m, x = shape_of(a_BHMX, OP)
    a_BKGMX = op.reshape(a_BHMX, [batch, heads // groups, groups * m, x])
    out = bb.emit(op.matmul(a_BKGMX, b_BKXN))
    return bb.emit(op.reshape(out, [batch, heads, m, shape_of(out, OP)[3]]))


def _softmax(bb, x: relax.Expr, softmax_dtype: str | None) -> relax.Expr:
    if softmax_dtype is not None and softmax_dtype != dtype_of(x):
        x = op.astype(x, softmax_dtype)
    return bb.emit(op.nn.softmax(x, axis=-1))


def _query_positions(bb, ins: AttentionInputs, past_len, q_len) -> relax.Expr:
    """Absolute position of each query: [S, 1] after past_len keys, or [B, 1, S, 1] = nonpad[b] - S + i
    for an external cache (bottom-right alignment)."""
    if ins.past_key is None and ins.nonpad_B is not None:
        steps_back = bb.emit(op.expand_dims(op.arange(_neg(q_len), 0, 1, "int64"), [1]))
        return op.add(bb.emit(op.expand_dims(op.astype(ins.nonpad_B, "int64"), [1, 2, 3])), steps_back)
    return bb.emit(op.expand_dims(op.arange(past_len, past_len + q_len, 1, "int64"), [1]))


def _attention_bias(bb, ins: AttentionInputs, past_len, q_len, kv_len, attrs: AttentionAttrs, dtype: str):
    """Sum of additive biases (0 or -inf, plus a float mask), broadcastable to [B, H, S, T]; None if none."""
    pieces = []
    if ins.mask is not None:
        pieces.append(_mask_bias(bb, ins.mask, kv_len, dtype))
    allowed = _structural_visibility(bb, ins, past_len, q_len, kv_len, attrs)
    if allowed is not None:
        pieces.append(op.where(allowed, scalar(0, dtype), scalar(NEG_INF, dtype)))
    if ins.nonpad_B is not None:
        key_pos = bb.emit(op.arange(0, kv_len, 1, "int64"))
        valid_B1T = bb.emit(op.less(key_pos, op.expand_dims(op.astype(ins.nonpad_B, "int64"), [1])))
        valid_B11T = op.expand_dims(valid_B1T, [1, 2])
        pieces.append(op.where(valid_B11T, scalar(0, dtype), scalar(NEG_INF, dtype)))
    if not pieces:
        return None
    bias = pieces[0]
    for piece in pieces[1:]:
        bias = op.add(bias, piece)
    return bb.emit(bias)


def _mask_bias(bb, mask: relax.Expr, kv_len, dtype: str) -> relax.Expr:
    """attn_mask as an additive bias over all kv_len keys; a shorter mask leaves the rest masked."""
    dims = shape_of(mask, OP)
    is_bool = dtype_of(mask) == "bool"
    missing = simplify_dim(kv_len - dims[-1])
    if not (isinstance(missing, int) and missing == 0):
        hidden = op.zeros([*dims[:-1], missing], "bool")  # (op.full with -inf fails to legalize in TVM 0.27)
        if not is_bool:
            hidden = op.where(hidden, scalar(0, dtype_of(mask)), scalar(NEG_INF, dtype_of(mask)))
        mask = bb.emit(op.concat([mask, hidden], axis=-1))
    if is_bool:
        return op.where(mask, scalar(0, dtype), scalar(NEG_INF, dtype))
    return op.astype(mask, dtype) if dtype_of(mask) != dtype else mask


def _structural_visibility(bb, ins: AttentionInputs, past_len, q_len, kv_len, attrs: AttentionAttrs):
    """Causal and window visibility: bool [S, T], or [B, 1, S, T] for an external cache; None if neither."""
    if not attrs.is_causal and not attrs.has_window:
        return None
    query_pos = _query_positions(bb, ins, past_len, q_len)
    key_pos = bb.emit(op.arange(0, kv_len, 1, "int64"))
    distance = bb.emit(op.subtract(query_pos, key_pos))  # query position - key position
    zero = relax.const(0, "int64")
    conditions = []
    if attrs.is_causal:
        conditions.append(op.greater_equal(distance, zero))
    if attrs.left_window >= 0:
        conditions.append(op.less_equal(distance, relax.const(attrs.left_window, "int64")))
    if attrs.right_window >= 0:
        conditions.append(op.greater_equal(distance, relax.const(-attrs.right_window, "int64")))
    allowed = conditions[0]
    for condition in conditions[1:]:
        allowed = op.logical_and(allowed, condition)
    return allowed


def _neg(dim):
    return -dim if isinstance(dim, int) else 0 - dim


def _split_heads(bb, x_BSN: relax.Expr, heads: int) -> relax.Expr:
    """[B, S, heads*D] -> [B, heads, S, D]."""
    batch, seq, hidden = shape_of(x_BSN, OP)
    hidden = static_dim(hidden, OP, "the hidden size of a 3-D input")
    if hidden % heads:
        raise GraphError(f"{OP}: hidden size {hidden} is not a multiple of {heads} heads")
    return bb.emit(op.permute_dims(op.reshape(x_BSN, [batch, seq, heads, hidden // heads]), [0, 2, 1, 3]))


def _merge_heads(bb, y_BHSD: relax.Expr) -> relax.Expr:
    """[B, H, S, D] -> [B, S, H*D]."""
    batch, heads, seq, dim = shape_of(y_BHSD, OP)
    return bb.emit(op.reshape(op.permute_dims(y_BHSD, [0, 2, 1, 3]), [batch, seq, heads * dim]))
