"""Decode attention over a ring-buffer KV cache as TIR, flash-decoding style, for CPU (llvm).

One new query token per sequence attends to the first ``lengths[b]`` slots of its cache
(kvc's ring contract: slots beyond nonpad_kv_seqlen were never written and are never read, so
they may hold anything, NaN included), plus an optional additive mask. Two kernels:

  partial  for every (batch, kv head, part of the live slots), in parallel: the live slots
           (lengths[b], never the capacity) are cut into chunks of ``chunk_size`` and the chunks
           into ``splits`` parts; each slot's key and value are loaded and converted to float32
           once and used by all G = H / K query heads of the group (a quantized cache's scales
           multiply the chunk's scores and weights, not every element); per head a part keeps
           its max score m, sum of exp(score - m) and the exp-weighted sum of values (online
           softmax across its chunks);
  merge    for every (batch, head): rescales the parts to the global max and normalizes.
Step cost thus follows the live context: a cache compiled for 32K slots costs what 256 do at a
short context.
An int8 cache on an AVX-512 BW target (spec.avx512_int16) multiplies integers instead: keys against an int16
copy of the query, values against int16 copies of each chunk's softmax weights (kernels.int16_dot): the
float path's per-element converts and per-slot lane sums were what bounded it.
A head with no visible slot (length 0, or every score -inf) outputs zeros, like ONNX's Attention.

Cache dtypes and scales: kvc.compiler.tvm.kernels.kv_read. Scores and accumulators are float32;
exp is kvc.compiler.tvm.kernels.fast_math.exp_f32 (vectorized, ~1e-7 relative error).

Legend: B batch, H query heads, K kv heads, G = H / K, C capacity (slots), D head size, S splits.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import relax, tirx
from tvm.script import tirx as T

from kvc.compiler.tvm.kernels import int16_dot
from kvc.compiler.tvm.kernels.fast_math import exp_f32, lane_sum
from kvc.compiler.tvm.kernels.kv_read import ScaleLayout, code_loader, scale_shape, scaled, vector_lanes
from kvc.compiler.tvm.kernels.spec import AttentionKernelSpec
from kvc.compiler.tvm.target import CPU_ONLY_ATTR
from kvc.errors import KvcError

NEG_INF = float("-inf")


@dataclass(frozen=True)
class DecodeAttentionSpec(AttentionKernelSpec):
    kernel_name = "decode attention"

    # Parts each (batch, kv head) is split into, run in parallel: enough for a few cores at
    # batch 1 with 3 kv heads; the merge reads splits partial results per head.
    splits: int = 4
    # The target has AVX-512 BW: an int8 cache's keys and values multiply as int16 pairs against an int16
    # copy of the query / weights (kernels.int16_dot) where the sizes allow (see integer_dot).
    avx512_int16: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.chunk_size <= 0 or self.splits <= 0:
            raise KvcError("decode attention: chunk_size and splits must be positive")

    @property
    def integer_dot(self) -> bool:
        return self.avx512_int16 and self.cache_dtype == "int8" and int16_dot.applies(self.head_dim, self.chunk_size)


def partial_kernel(spec: DecodeAttentionSpec) -> tirx.PrimFunc:
    """(q, k, v, lengths, k_scale, v_scale, mask) -> (acc [B,H,S,D], max [B,H,S], sum [B,H,S]).

    S = spec.splits fixed parts per (batch, kv head): part i walks live chunks i*per .. (i+1)*per-1
    (per = ceil(live chunks / S)) with an online softmax across its chunks, so the work and the
    outputs follow the live length, never the capacity C."""
    H, K, D, G, CH, S = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.group_size, spec.chunk_size, spec.splits
    LANES = vector_lanes(D)
    SUM_LANES = next(n for n in (8, 4, 2, 1) if CH % n == 0)
    sum_lanes = lane_sum(LANES)
    cache_dtype, q_dtype = spec.cache_dtype, spec.query_dtype
    sm_scale = spec.scale
    code, layout = code_loader(spec.cache_dtype, spec.hardware_half), spec.scale_layout
    quantized = layout is not ScaleLayout.NONE  # float caches have no scales to apply
    integer = spec.integer_dot
    quantize_query, quantize_weights = int16_dot.quantize_rows(G, D), int16_dot.quantize_rows(G, CH)
    integer_key_scores, integer_weighted_values = int16_dot.key_scores(G, D), int16_dot.weighted_values(G, D)

    @T.prim_func(s_tir=True)
    def decode_attention_partial(q_handle: T.handle, k_handle: T.handle, v_handle: T.handle, len_handle: T.handle,
                                 ks_handle: T.handle, vs_handle: T.handle, mask_handle: T.handle,
                                 acc_handle: T.handle, max_handle: T.handle, sum_handle: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, CPU_ONLY_ATTR: True})
        B = T.int64()
        C = T.int64()
        Q = T.match_buffer(q_handle, (B, H, 1, D), q_dtype)
        KC = T.match_buffer(k_handle, (B, K, C, D), cache_dtype)
        VC = T.match_buffer(v_handle, (B, K, C, D), cache_dtype)
        lengths = T.match_buffer(len_handle, (B,), "int64")
        KS = T.match_buffer(ks_handle, scale_shape(spec.scale_layout, K, B, C), "float32")
        VS = T.match_buffer(vs_handle, scale_shape(spec.scale_layout, K, B, C), "float32")
        mask = T.match_buffer(mask_handle, _mask_shape(spec, B, C), "float32")
        acc_out = T.match_buffer(acc_handle, (B, H, S, D), "float32")
        max_out = T.match_buffer(max_handle, (B, H, S), "float32")
        sum_out = T.match_buffer(sum_handle, (B, H, S), "float32")
        for work in T.parallel(B * K * S):
            with T.sblock("part"):
                # opaque: the live extents below are let-bound inside the block
                T.reads()
                T.writes()
                q_local = T.sblock_alloc_buffer((G, D), "float32")
                kv_local = T.sblock_alloc_buffer((D,), "float32")
                scores = T.sblock_alloc_buffer((G, CH), "float32")
                m = T.sblock_alloc_buffer((G,), "float32")
                s = T.sblock_alloc_buffer((G,), "float32")
                m_chunk = T.sblock_alloc_buffer((G,), "float32")
                alpha = T.sblock_alloc_buffer((G,), "float32")
                p = T.sblock_alloc_buffer((1,), "float32")
                dot = T.sblock_alloc_buffer((LANES,), "float32")
                part = T.sblock_alloc_buffer((SUM_LANES,), "float32")
                acc = T.sblock_alloc_buffer((G, D), "float32")
                # integer path: int16 query and weights with their per-head scales, widened keys, int32 sums
                q16 = T.sblock_alloc_buffer((G, D), "int16")
                q_scale = T.sblock_alloc_buffer((G,), "float32")
                k16 = T.sblock_alloc_buffer((int16_dot.KEY_BLOCK, D), "int16")
                w16 = T.sblock_alloc_buffer((G, CH), "int16")
                w_scale = T.sblock_alloc_buffer((G,), "float32")
                acc32 = T.sblock_alloc_buffer((G, D), "int32")
                b: T.let[T.int64] = work // (K * S)
                kh: T.let[T.int64] = work // S % K
                i: T.let[T.int64] = work % S
                live: T.let[T.int64] = T.max(T.min(lengths[b], C), T.int64(0))
                per: T.let[T.int64] = ((live + (CH - 1)) // CH + (S - 1)) // S  # chunks per part
                first: T.let[T.int64] = i * per
                for g in T.serial(T.int64(G)):
                    m[g] = T.float32(NEG_INF)
                    s[g] = T.float32(0)
                    for d in T.vectorized(T.int64(D)):
                        q_local[g, d] = T.Cast("float32", Q[b, kh * G + g, 0, d]) * T.float32(sm_scale)
                        acc[g, d] = T.float32(0)
                if integer:
                    quantize_query(q_local, q16, q_scale)
                for ci in T.serial(per):
                    start: T.let[T.int64] = (first + ci) * CH
                    valid: T.let[T.int64] = T.max(T.min(live - start, T.int64(CH)), T.int64(0))
                    for g in T.serial(T.int64(G)):
                        m_chunk[g] = T.float32(NEG_INF)
                    if integer:
                        integer_key_scores(KC, k16, q16, q_scale, scores, b, kh, start, valid, C)
                    else:
                        for t in T.serial(valid):
                            for d in T.vectorized(T.int64(D)):
                                kv_local[d] = code(KC, b, kh, start + t, d)
                            for g in T.serial(T.int64(G)):
                                for lane in T.vectorized(T.int64(LANES)):
                                    dot[lane] = T.float32(0)
                                for j in T.serial(T.int64(D // LANES)):
                                    for lane in T.vectorized(T.int64(LANES)):
                                        dot[lane] = dot[lane] + q_local[g, j * LANES + lane] * kv_local[j * LANES + lane]
                                sum_lanes(dot)
                                scores[g, t] = dot[0]
                    # Key scales, mask and the chunk's max, vectorized over its slots (reads clamped into
                    # the ring; slots past valid are -inf). A per-token scale multiplies a score, not each
                    # of the key's D elements: the converts, not the multiplies, bound an int8 cache.
                    for g in T.serial(T.int64(G)):
                        for t in T.vectorized(T.int64(CH)):
                            scores[g, t] = T.Select(
                                t < valid,
                                scaled(layout, scores[g, t], KS, b, kh, T.min(start + t, C - 1))
                                + _mask_value(spec, mask, b, T.min(start + t, C - 1)),
                                T.float32(NEG_INF))
                        for lane in T.vectorized(T.int64(SUM_LANES)):
                            part[lane] = T.float32(NEG_INF)
                        for j in T.serial(T.int64(CH // SUM_LANES)):
                            for lane in T.vectorized(T.int64(SUM_LANES)):
                                part[lane] = T.max(part[lane], scores[g, j * SUM_LANES + lane])
                        m_chunk[g] = T.float32(NEG_INF)
                        for lane in T.serial(T.int64(SUM_LANES)):
                            m_chunk[g] = T.max(m_chunk[g], part[lane])
                    # Online softmax across the part's chunks: rescale what was kept to the new max.
                    # The chunk's weights are vectorized over its slots (exp_f32 vectorizes, T.exp
                    # would be one libm call per slot and head); nothing visible yet keeps zeros.
                    for g in T.serial(T.int64(G)):
                        p[0] = T.max(m[g], m_chunk[g])
                        alpha[g] = T.if_then_else(m[g] == T.float32(NEG_INF), T.float32(0),
                                                  exp_f32(m[g] - p[0]))
                        m[g] = p[0]
                        p[0] = T.if_then_else(p[0] == T.float32(NEG_INF), T.float32(0), p[0])
                        for t in T.vectorized(T.int64(CH)):
                            scores[g, t] = T.Select(t < valid, exp_f32(scores[g, t] - p[0]), T.float32(0))
                        for lane in T.vectorized(T.int64(SUM_LANES)):
                            part[lane] = T.float32(0)
                        for j in T.serial(T.int64(CH // SUM_LANES)):
                            for lane in T.vectorized(T.int64(SUM_LANES)):
                                part[lane] = part[lane] + scores[g, j * SUM_LANES + lane]
                        s[g] = s[g] * alpha[g]
                        for lane in T.serial(T.int64(SUM_LANES)):
                            s[g] = s[g] + part[lane]
                        for d in T.vectorized(T.int64(D)):
                            acc[g, d] = acc[g, d] * alpha[g]
                        # value scales join the weights only now: the sum s above must not include them
                        if quantized:
                            for t in T.vectorized(T.int64(CH)):
                                scores[g, t] = T.Select(
                                    t < valid, scaled(layout, scores[g, t], VS, b, kh, T.min(start + t, C - 1)),
                                    T.float32(0))
                    if integer:
                        quantize_weights(scores, w16, w_scale)
                        integer_weighted_values(VC, w16, w_scale, acc32, acc, b, kh, start, valid, C)
                    else:
                        for t in T.serial(valid):
                            for d in T.vectorized(T.int64(D)):
                                kv_local[d] = code(VC, b, kh, start + t, d)
                            for g in T.serial(T.int64(G)):
                                for d in T.vectorized(T.int64(D)):
                                    acc[g, d] = acc[g, d] + scores[g, t] * kv_local[d]
                for g in T.serial(T.int64(G)):
                    max_out[b, kh * G + g, i] = m[g]
                    sum_out[b, kh * G + g, i] = s[g]
                    for d in T.vectorized(T.int64(D)):
                        acc_out[b, kh * G + g, i, d] = acc[g, d]

    return decode_attention_partial


def merge_kernel(spec: DecodeAttentionSpec) -> tirx.PrimFunc:
    """(acc [B,H,N,D], max [B,H,N], sum [B,H,N]) -> out [B, H, 1, D]."""
    H, D = spec.num_heads, spec.head_dim
    out_dtype = spec.query_dtype

    @T.prim_func(s_tir=True)
    def decode_attention_merge(acc_handle: T.handle, max_handle: T.handle, sum_handle: T.handle,
                               out_handle: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, CPU_ONLY_ATTR: True})
        B = T.int64()
        N = T.int64()
        acc_in = T.match_buffer(acc_handle, (B, H, N, D), "float32")
        max_in = T.match_buffer(max_handle, (B, H, N), "float32")
        sum_in = T.match_buffer(sum_handle, (B, H, N), "float32")
        out = T.match_buffer(out_handle, (B, H, 1, D), out_dtype)
        for work in T.parallel(B * H):
            with T.sblock("merge"):
                total = T.sblock_alloc_buffer((D,), "float32")
                m = T.sblock_alloc_buffer((1,), "float32")
                s = T.sblock_alloc_buffer((1,), "float32")
                w = T.sblock_alloc_buffer((1,), "float32")
                b: T.let[T.int64] = work // H
                h: T.let[T.int64] = work % H
                m[0] = T.float32(NEG_INF)
                s[0] = T.float32(0)
                for d in T.vectorized(T.int64(D)):
                    total[d] = T.float32(0)
                for c in T.serial(N):
                    m[0] = T.max(m[0], max_in[b, h, c])
                for c in T.serial(N):
                    if max_in[b, h, c] != T.float32(NEG_INF):
                        w[0] = T.exp(max_in[b, h, c] - m[0])
                        s[0] = s[0] + sum_in[b, h, c] * w[0]
                        for d in T.vectorized(T.int64(D)):
                            total[d] = total[d] + acc_in[b, h, c, d] * w[0]
                for d in T.vectorized(T.int64(D)):
                    out[b, h, 0, d] = T.Cast(out_dtype, T.if_then_else(s[0] > T.float32(0), total[d] / s[0],
                                                                       T.float32(0)))

    return decode_attention_merge


def emit_decode_attention(bb: relax.BlockBuilder, spec: DecodeAttentionSpec, q_BH1D: relax.Expr,
                          k_BKCD: relax.Expr, v_BKCD: relax.Expr, lengths_B: relax.Expr,
                          k_scale: relax.Expr | None = None, v_scale: relax.Expr | None = None,
                          mask_B11C: relax.Expr | None = None) -> relax.Expr:
    """Emit both kernels into ``bb``; returns the [B, H, 1, D] output in the query's dtype.

    Scales: [B, K, C] (or [B, K, C, 1], as kvc's scale rings are) for PER_TOKEN, [K] for PER_HEAD."""
    batch = q_BH1D.ty.shape.values[0]
    capacity = k_BKCD.ty.shape.values[2]
    chunks = spec.splits  # partial results per (batch, head): fixed, whatever the capacity
    H, D = spec.num_heads, spec.head_dim
    placeholder = relax.const(np.ones(1, np.float32))
    if spec.scale_layout is ScaleLayout.PER_TOKEN:
        k_scale, v_scale = (relax.op.reshape(s, [batch, spec.num_kv_heads, capacity]) for s in (k_scale, v_scale))
    elif spec.scale_layout is ScaleLayout.NONE:
        k_scale = v_scale = placeholder
    mask = relax.op.astype(mask_B11C, "float32") if spec.has_mask else relax.const(np.zeros((1, 1, 1, 1), np.float32))
    lengths = relax.op.astype(lengths_B, "int64")
    partial = bb.add_func(partial_kernel(spec), "decode_attention_partial")
    merge = bb.add_func(merge_kernel(spec), "decode_attention_merge")
    parts = bb.emit(relax.call_tir(partial, [q_BH1D, k_BKCD, v_BKCD, lengths, k_scale, v_scale, mask], [
        relax.TensorType([batch, H, chunks, D], "float32"),
        relax.TensorType([batch, H, chunks], "float32"),
        relax.TensorType([batch, H, chunks], "float32"),
    ]))
    acc, mx, sm = (bb.emit(relax.TupleGetItem(parts, i)) for i in range(3))
    return bb.emit(relax.call_tir(merge, [acc, mx, sm], relax.TensorType([batch, H, 1, D], spec.query_dtype)))


# --- pieces evaluated while the kernels are parsed -----------------------------------------------

def _mask_shape(spec: DecodeAttentionSpec, batch, capacity) -> tuple:
    return (batch, 1, 1, capacity) if spec.has_mask else (1, 1, 1, 1)


def _mask_value(spec: DecodeAttentionSpec, mask, b, slot):
    return mask[b, 0, 0, slot] if spec.has_mask else tirx.const(0, "float32")
