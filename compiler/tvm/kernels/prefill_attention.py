"""Prefill attention over a ring-buffer KV cache as TIR (flash-attention forward), for CPU (llvm).

S new queries per sequence attend to the first ``lengths[b]`` slots of its cache (kvc's ring contract:
later slots were never written and are never read), plus an optional additive mask [B, 1, S, C] and
optional bottom-right causality (query i sees slot j <= lengths[b] - S + i, as ONNX's Attention with
nonpad_kv_seqlen). One parallel task per (batch, kv head, tile of ``query_tile`` queries) holds the
tile's rows for all G = H / K query heads of the group and walks the cache in chunks of
``chunk_size`` slots with a running max and sum (online softmax): each slot's key and value are
dequantized once per task and used by all G * query_tile rows. A row with no visible slot outputs
zeros, like ONNX's Attention.

Legend: B batch, H query heads, K kv heads, G = H / K, S queries, C capacity (slots), D head size.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import relax, tirx
from tvm.script import tirx as T

from kvc.compiler.tvm.kernels.fast_math import exp_f32, lane_sum
from kvc.compiler.tvm.kernels.kv_read import ScaleLayout, scale_shape, slot_loader, vector_lanes
from kvc.compiler.tvm.kernels.spec import AttentionKernelSpec
from kvc.compiler.tvm.target import CPU_ONLY_ATTR
from kvc.errors import KvcError

NEG_INF = float("-inf")


@dataclass(frozen=True)
class PrefillAttentionSpec(AttentionKernelSpec):
    kernel_name = "prefill attention"
    causal: bool = False
    query_tile: int = 16

    def __post_init__(self):
        super().__post_init__()
        if self.chunk_size <= 0 or self.query_tile <= 0:
            raise KvcError("prefill attention: chunk_size and query_tile must be positive")


def prefill_kernel(spec: PrefillAttentionSpec) -> tirx.PrimFunc:
    """(q [B,H,S,D], k, v [B,K,C,D], lengths [B], k_scale, v_scale, mask) -> out [B, H, S, D]."""
    H, K, D, G = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.group_size
    TS, CH, LANES = spec.query_tile, spec.chunk_size, vector_lanes(spec.head_dim)
    sum_lanes = lane_sum(LANES)
    R = G * TS  # rows per task: query head g, query i -> row g * TS + i
    cache_dtype, q_dtype, sm_scale = spec.cache_dtype, spec.query_dtype, spec.scale
    load = slot_loader(spec.cache_dtype, spec.scale_layout, spec.hardware_half)

    @T.prim_func(s_tir=True)
    def prefill_attention(q_handle: T.handle, k_handle: T.handle, v_handle: T.handle, len_handle: T.handle,
                          ks_handle: T.handle, vs_handle: T.handle, mask_handle: T.handle, out_handle: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, CPU_ONLY_ATTR: True})
        B = T.int64()
        S = T.int64()
        C = T.int64()
        Q = T.match_buffer(q_handle, (B, H, S, D), q_dtype)
        KC = T.match_buffer(k_handle, (B, K, C, D), cache_dtype)
        VC = T.match_buffer(v_handle, (B, K, C, D), cache_dtype)
        lengths = T.match_buffer(len_handle, (B,), "int64")
        KS = T.match_buffer(ks_handle, scale_shape(spec.scale_layout, K, B, C), "float32")
        VS = T.match_buffer(vs_handle, scale_shape(spec.scale_layout, K, B, C), "float32")
        mask = T.match_buffer(mask_handle, _mask_shape(spec, B, S, C), "float32")
        out = T.match_buffer(out_handle, (B, H, S, D), q_dtype)
        for work in T.parallel(B * K * ((S + TS - 1) // TS)):
            with T.sblock("tile"):
                q_local = T.sblock_alloc_buffer((R, D), "float32")
                acc = T.sblock_alloc_buffer((R, D), "float32")
                scores = T.sblock_alloc_buffer((R, CH), "float32")
                m = T.sblock_alloc_buffer((R,), "float32")
                total = T.sblock_alloc_buffer((R,), "float32")
                kv_local = T.sblock_alloc_buffer((D,), "float32")
                dot = T.sblock_alloc_buffer((LANES,), "float32")
                x = T.sblock_alloc_buffer((2,), "float32")  # scratch: [0] a score / the new max, [1] rescale
                tiles: T.let[T.int64] = (S + TS - 1) // TS
                b: T.let[T.int64] = work // (K * tiles)
                kh: T.let[T.int64] = work // tiles % K
                s0: T.let[T.int64] = work % tiles * TS
                rows: T.let[T.int64] = T.min(S - s0, T.int64(TS))
                n_valid: T.let[T.int64] = lengths[b]
                for g, i in T.grid(T.int64(G), T.int64(TS)):
                    m[g * TS + i] = T.float32(NEG_INF)
                    total[g * TS + i] = T.float32(0)
                    for d in T.vectorized(T.int64(D)):
                        acc[g * TS + i, d] = T.float32(0)
                        q_local[g * TS + i, d] = T.if_then_else(  # min(): in bounds even past the last row
                            i < rows, T.Cast("float32", Q[b, kh * G + g, T.min(s0 + i, S - 1), d]),
                            T.float32(0)) * T.float32(sm_scale)
                for c in T.serial((C + CH - 1) // CH):
                    start: T.let[T.int64] = c * CH
                    valid: T.let[T.int64] = T.max(T.min(T.min(n_valid, C) - start, T.int64(CH)), T.int64(0))
                    for t in T.serial(T.int64(CH)):
                        if t < valid:
                            for d in T.vectorized(T.int64(D)):
                                kv_local[d] = load(KC, KS, b, kh, start + t, d)
                            for g, i in T.grid(T.int64(G), T.int64(TS)):
                                if i < rows:
                                    for lane in T.vectorized(T.int64(LANES)):
                                        dot[lane] = T.float32(0)
                                    for j in T.serial(T.int64(D // LANES)):
                                        for lane in T.vectorized(T.int64(LANES)):
                                            dot[lane] = dot[lane] + q_local[g * TS + i, j * LANES + lane] \
                                                * kv_local[j * LANES + lane]
                                    sum_lanes(dot)
                                    scores[g * TS + i, t] = _bias(spec, mask, b, s0 + i, start + t, n_valid, S) + dot[0]
                    for r in T.serial(T.int64(R)):  # online softmax: fold this chunk into row r
                        if r % TS < rows:
                            x[0] = m[r]
                            for t in T.serial(T.int64(CH)):
                                if t < valid:
                                    x[0] = T.max(x[0], scores[r, t])
                            if x[0] != T.float32(NEG_INF):
                                x[1] = T.if_then_else(m[r] == T.float32(NEG_INF), T.float32(0), T.exp(m[r] - x[0]))
                                m[r] = x[0]
                                total[r] = total[r] * x[1]
                                for d in T.vectorized(T.int64(D)):
                                    acc[r, d] = acc[r, d] * x[1]
                                for t in T.vectorized(T.int64(CH)):  # exp_f32 vectorizes, T.exp would not
                                    scores[r, t] = T.Select(t < valid, exp_f32(scores[r, t] - x[0]), T.float32(0))
                                for t in T.serial(T.int64(CH)):
                                    total[r] = total[r] + scores[r, t]
                            else:
                                for t in T.serial(T.int64(CH)):
                                    scores[r, t] = T.float32(0)
                    for t in T.serial(T.int64(CH)):
                        if t < valid:
                            for d in T.vectorized(T.int64(D)):
                                kv_local[d] = load(VC, VS, b, kh, start + t, d)
                            for r in T.serial(T.int64(R)):
                                if r % TS < rows:
                                    for d in T.vectorized(T.int64(D)):
                                        acc[r, d] = acc[r, d] + scores[r, t] * kv_local[d]
                for g, i in T.grid(T.int64(G), T.int64(TS)):
                    if i < rows:
                        for d in T.vectorized(T.int64(D)):
                            out[b, kh * G + g, s0 + i, d] = T.Cast(q_dtype, T.if_then_else(
                                total[g * TS + i] > T.float32(0), acc[g * TS + i, d] / total[g * TS + i],
                                T.float32(0)))

    return prefill_attention


def emit_prefill_attention(bb: relax.BlockBuilder, spec: PrefillAttentionSpec, q_BHSD: relax.Expr,
                           k_BKCD: relax.Expr, v_BKCD: relax.Expr, lengths_B: relax.Expr,
                           k_scale: relax.Expr | None = None, v_scale: relax.Expr | None = None,
                           mask_B1SC: relax.Expr | None = None) -> relax.Expr:
    """Emit the kernel into ``bb``; returns the [B, H, S, D] output in the query's dtype.

    Scales: [B, K, C] (or [B, K, C, 1], as kvc's scale rings are) for PER_TOKEN, [K] for PER_HEAD;
    the mask must already be float32 [B, 1, S, C]."""
    batch, _, seq, _ = q_BHSD.ty.shape.values
    capacity = k_BKCD.ty.shape.values[2]
    if spec.scale_layout is ScaleLayout.PER_TOKEN:
        k_scale, v_scale = (relax.op.reshape(s, [batch, spec.num_kv_heads, capacity]) for s in (k_scale, v_scale))
    elif spec.scale_layout is ScaleLayout.NONE:
        k_scale = v_scale = relax.const(np.ones(1, np.float32))
    mask = mask_B1SC if spec.has_mask else relax.const(np.zeros((1, 1, 1, 1), np.float32))
    kernel = bb.add_func(prefill_kernel(spec), "prefill_attention")
    return bb.emit(relax.call_tir(kernel, [q_BHSD, k_BKCD, v_BKCD, relax.op.astype(lengths_B, "int64"),
                                           k_scale, v_scale, mask],
                                  relax.TensorType(q_BHSD.ty.shape, spec.query_dtype)))


def _mask_shape(spec: PrefillAttentionSpec, batch, seq, capacity) -> tuple:
    return (batch, 1, seq, capacity) if spec.has_mask else (1, 1, 1, 1)


def _bias(spec: PrefillAttentionSpec, mask, b, query, slot, n_valid, seq):
    """Additive mask value, and -inf for a slot after the query under bottom-right causality."""
    value = mask[b, 0, query, slot] if spec.has_mask else tirx.const(0, "float32")
    if not spec.causal:
        return value
    return tirx.if_then_else(slot > n_valid - seq + query, tirx.const(NEG_INF, "float32"), value)
