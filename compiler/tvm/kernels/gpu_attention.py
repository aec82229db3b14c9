"""Decode and prefill attention over a ring-buffer KV cache as TIR for CUDA (GPU variants of
decode_attention.py and prefill_attention.py, same inputs, outputs and semantics).

One thread block per (batch, kv head, part): the block walks its share of the live slots (never the
capacity) in chunks of ``chunk_size`` slots. Per chunk:
  1. the K tile is loaded coalesced (consecutive threads, consecutive bytes) and dequantized in
     registers (int8 * scale, float8 e4m3fn bits -> float32 * scale, float16 -> float32) into a
     float32 shared tile [chunk, D + 1] (the pad keeps the per-slot dot products free of bank conflicts);
  2. scores for every (row, slot), rows being the G = H / K query heads of the group (decode) or
     G x query_tile (prefill), so each K/V element is read once per block for all of them;
  3. online softmax per row (running max and sum), the chunk's weights exponentiated in parallel;
  4. the V tile loaded like K into the same shared tile; each thread owns (row, d) accumulators.
Decode splits the live chunks into ``splits`` parts (flash-decoding) and a merge kernel combines the
parts; prefill keeps whole rows per block. A row that sees no slot outputs zeros, like ONNX's Attention.

Each phase is a loop over threadIdx.x; TVM's ThreadSync inserts the barriers between phases that share
memory. ``emulate=True`` builds the same kernels with those loops serial and the shared tiles in
ordinary memory, so they run on llvm: the phases are independent across threads, so serial order gives
the parallel result, and tests/compiler/test_tvm_gpu_kernels.py checks them against numpy on a
machine without a GPU.

Legend: B batch, H query heads, K kv heads, G = H / K, C capacity (slots), D head size, S splits.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import relax, tirx
from tvm.script import tirx as T

from kvc.compiler.tvm.kernels.decode_attention import DecodeAttentionSpec
from kvc.compiler.tvm.kernels.kv_read import ScaleLayout, scale_shape, slot_loader
from kvc.compiler.tvm.kernels.prefill_attention import PrefillAttentionSpec
from kvc.errors import KvcError

NEG_INF = float("-inf")
THREADS = 128  # per block: four warps
SHARED_BUDGET = 40 * 1024  # bytes of shared memory per block: under the 48 KiB every CUDA GPU gives statically
CHUNK_CHOICES = (64, 32, 16, 8)
TILE_CHOICES = (16, 8, 4, 2, 1)


@dataclass(frozen=True)
class GpuLaunch:
    """How a kernel runs: on CUDA threads, or emulated serially on the CPU (tests)."""

    emulate: bool = False
    threads: int = THREADS

    @property
    def shared(self) -> str:
        return "global" if self.emulate else "shared"

    def blocks(self, extent):
        return T.serial(extent) if self.emulate else T.thread_binding(extent, thread="blockIdx.x")

    def lanes(self):
        extent = T.int64(self.threads)
        return T.serial(extent) if self.emulate else T.thread_binding(extent, thread="threadIdx.x")


def _shared_bytes(rows: int, chunk: int, head_dim: int) -> int:
    """q and accumulators [rows, D], scores [rows, chunk], the K/V tile [chunk, D + 1], 3 x [rows]."""
    return 4 * (2 * rows * head_dim + rows * chunk + chunk * (head_dim + 1) + 3 * rows)


def gpu_decode_spec(spec: DecodeAttentionSpec, splits: int = 32) -> DecodeAttentionSpec:
    """The spec with a chunk that fits shared memory and ``splits`` parts (enough blocks at batch 1)."""
    for chunk in CHUNK_CHOICES:
        if _shared_bytes(spec.group_size, chunk, spec.head_dim) <= SHARED_BUDGET:
            return DecodeAttentionSpec(**{**spec.__dict__, "chunk_size": chunk, "splits": splits})
    raise KvcError(f"GPU decode attention: {spec.group_size} query heads per kv head x head dim {spec.head_dim} "
                   "do not fit one thread block's shared memory")


def gpu_prefill_spec(spec: PrefillAttentionSpec, chunk: int = 32) -> PrefillAttentionSpec:
    """The spec with the largest query tile whose rows fit one block (threads and shared memory)."""
    for tile in TILE_CHOICES:
        rows = spec.group_size * tile
        if rows <= THREADS and _shared_bytes(rows, chunk, spec.head_dim) <= SHARED_BUDGET:
            return PrefillAttentionSpec(**{**spec.__dict__, "chunk_size": chunk, "query_tile": tile})
    raise KvcError(f"GPU prefill attention: {spec.group_size} query heads per kv head x head dim {spec.head_dim} "
                   "do not fit one thread block")


def for_gpu(spec: DecodeAttentionSpec | PrefillAttentionSpec):
    """(spec fitted to a thread block, its emit function) for a CPU kernel's spec."""
    if isinstance(spec, DecodeAttentionSpec):
        return gpu_decode_spec(spec), emit_gpu_decode_attention
    return gpu_prefill_spec(spec), emit_gpu_prefill_attention


def _ceil(a: int, b: int) -> int:
    return (a + b - 1) // b


def decode_partial_kernel(spec: DecodeAttentionSpec, launch: GpuLaunch = GpuLaunch()) -> tirx.PrimFunc:
    """(q, k, v, lengths, k_scale, v_scale, mask) -> (acc [B,H,S,D], max [B,H,S], sum [B,H,S])."""
    H, K, D, G, CH, S = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.group_size, spec.chunk_size, spec.splits
    NT, SH = launch.threads, launch.shared
    if G > NT:
        raise KvcError(f"GPU decode attention: {G} query heads per kv head exceed {NT} threads")
    cache_dtype, q_dtype, sm_scale = spec.cache_dtype, spec.query_dtype, spec.scale
    load = slot_loader(spec.cache_dtype, spec.scale_layout)
    GD, GCH, CHD = G * D, G * CH, CH * D
    DP = D + 1  # the tile's row stride: the pad spreads a column over all banks

    @T.prim_func(s_tir=True)
    def gpu_decode_attention_partial(q_handle: T.handle, k_handle: T.handle, v_handle: T.handle,
                                     len_handle: T.handle, ks_handle: T.handle, vs_handle: T.handle,
                                     mask_handle: T.handle, acc_handle: T.handle, max_handle: T.handle,
                                     sum_handle: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        B = T.int64()
        C = T.int64()
        Q = T.match_buffer(q_handle, (B, H, 1, D), q_dtype)
        KC = T.match_buffer(k_handle, (B, K, C, D), cache_dtype)
        VC = T.match_buffer(v_handle, (B, K, C, D), cache_dtype)
        lengths = T.match_buffer(len_handle, (B,), "int64")
        KS = T.match_buffer(ks_handle, scale_shape(spec.scale_layout, K, B, C), "float32")
        VS = T.match_buffer(vs_handle, scale_shape(spec.scale_layout, K, B, C), "float32")
        mask = T.match_buffer(mask_handle, (B, 1, 1, C) if spec.has_mask else (1, 1, 1, 1), "float32")
        acc_out = T.match_buffer(acc_handle, (B, H, S, D), "float32")
        max_out = T.match_buffer(max_handle, (B, H, S), "float32")
        sum_out = T.match_buffer(sum_handle, (B, H, S), "float32")
        for work in launch.blocks(B * K * S):
            with T.sblock("part"):
                T.reads()
                T.writes()
                q_sh = T.sblock_alloc_buffer((G, D), "float32", scope=SH)
                acc_sh = T.sblock_alloc_buffer((G, D), "float32", scope=SH)
                p_sh = T.sblock_alloc_buffer((G, CH), "float32", scope=SH)
                kv_sh = T.sblock_alloc_buffer((CH * DP,), "float32", scope=SH)
                m_sh = T.sblock_alloc_buffer((G,), "float32", scope=SH)
                s_sh = T.sblock_alloc_buffer((G,), "float32", scope=SH)
                alpha_sh = T.sblock_alloc_buffer((G,), "float32", scope=SH)
                reg = T.sblock_alloc_buffer((1,), "float32", scope="local")
                b: T.let[T.int64] = work // (K * S)
                kh: T.let[T.int64] = work // S % K
                part: T.let[T.int64] = work % S
                live: T.let[T.int64] = T.max(T.min(lengths[b], C), T.int64(0))
                per: T.let[T.int64] = ((live + (CH - 1)) // CH + (S - 1)) // S  # chunks per part
                for tx in launch.lanes():
                    for j in T.serial(T.int64(_ceil(GD, NT))):
                        if j * NT + tx < GD:
                            q_sh[(j * NT + tx) // D, (j * NT + tx) % D] = T.Cast(
                                "float32", Q[b, kh * G + (j * NT + tx) // D, 0, (j * NT + tx) % D]) \
                                * T.float32(sm_scale)
                            acc_sh[(j * NT + tx) // D, (j * NT + tx) % D] = T.float32(0)
                    if tx < G:
                        m_sh[tx] = T.float32(NEG_INF)
                        s_sh[tx] = T.float32(0)
                for ci in T.serial(per):
                    start: T.let[T.int64] = (part * per + ci) * CH
                    valid: T.let[T.int64] = T.max(T.min(live - start, T.int64(CH)), T.int64(0))
                    for tx in launch.lanes():  # K tile, coalesced, dequantized in registers
                        for j in T.serial(T.int64(_ceil(CHD, NT))):
                            if j * NT + tx < CHD:
                                if (j * NT + tx) // D < valid:
                                    kv_sh[((j * NT + tx) // D) * DP + (j * NT + tx) % D] = load(
                                        KC, KS, b, kh, start + (j * NT + tx) // D, (j * NT + tx) % D)
                                else:
                                    kv_sh[((j * NT + tx) // D) * DP + (j * NT + tx) % D] = T.float32(0)
                    for tx in launch.lanes():  # scores [G, CH]
                        for j in T.serial(T.int64(_ceil(GCH, NT))):
                            if j * NT + tx < GCH:
                                if (j * NT + tx) % CH < valid:
                                    reg[0] = _decode_mask(spec, mask, b, start + (j * NT + tx) % CH)
                                    for d in T.serial(T.int64(D)):
                                        reg[0] = reg[0] + q_sh[(j * NT + tx) // CH, d] * kv_sh[((j * NT + tx) % CH) * DP + d]
                                    p_sh[(j * NT + tx) // CH, (j * NT + tx) % CH] = reg[0]
                                else:
                                    p_sh[(j * NT + tx) // CH, (j * NT + tx) % CH] = T.float32(NEG_INF)
                    for tx in launch.lanes():  # new running max per row; rescale factor of what was kept
                        if tx < G:
                            reg[0] = m_sh[tx]
                            for t in T.serial(T.int64(CH)):
                                reg[0] = T.max(reg[0], p_sh[tx, t])
                            alpha_sh[tx] = T.if_then_else(m_sh[tx] == T.float32(NEG_INF), T.float32(0),
                                                          T.exp(m_sh[tx] - reg[0]))
                            m_sh[tx] = reg[0]
                    for tx in launch.lanes():  # the chunk's weights
                        for j in T.serial(T.int64(_ceil(GCH, NT))):
                            if j * NT + tx < GCH:
                                p_sh[(j * NT + tx) // CH, (j * NT + tx) % CH] = T.if_then_else(
                                    m_sh[(j * NT + tx) // CH] == T.float32(NEG_INF), T.float32(0),
                                    T.exp(p_sh[(j * NT + tx) // CH, (j * NT + tx) % CH] - m_sh[(j * NT + tx) // CH]))
                    for tx in launch.lanes():  # running sums; V tile (the K tile is no longer read)
                        if tx < G:
                            reg[0] = s_sh[tx] * alpha_sh[tx]
                            for t in T.serial(T.int64(CH)):
                                reg[0] = reg[0] + p_sh[tx, t]
                            s_sh[tx] = reg[0]
                        for j in T.serial(T.int64(_ceil(CHD, NT))):
                            if j * NT + tx < CHD:
                                if (j * NT + tx) // D < valid:
                                    kv_sh[((j * NT + tx) // D) * DP + (j * NT + tx) % D] = load(
                                        VC, VS, b, kh, start + (j * NT + tx) // D, (j * NT + tx) % D)
                                else:
                                    kv_sh[((j * NT + tx) // D) * DP + (j * NT + tx) % D] = T.float32(0)
                    for tx in launch.lanes():  # accumulators: thread owns (g, d)
                        for j in T.serial(T.int64(_ceil(GD, NT))):
                            if j * NT + tx < GD:
                                reg[0] = acc_sh[(j * NT + tx) // D, (j * NT + tx) % D] * alpha_sh[(j * NT + tx) // D]
                                for t in T.serial(T.int64(CH)):
                                    reg[0] = reg[0] + p_sh[(j * NT + tx) // D, t] * kv_sh[(t) * DP + (j * NT + tx) % D]
                                acc_sh[(j * NT + tx) // D, (j * NT + tx) % D] = reg[0]
                for tx in launch.lanes():
                    for j in T.serial(T.int64(_ceil(GD, NT))):
                        if j * NT + tx < GD:
                            acc_out[b, kh * G + (j * NT + tx) // D, part, (j * NT + tx) % D] = \
                                acc_sh[(j * NT + tx) // D, (j * NT + tx) % D]
                    if tx < G:
                        max_out[b, kh * G + tx, part] = m_sh[tx]
                        sum_out[b, kh * G + tx, part] = s_sh[tx]

    return gpu_decode_attention_partial


def decode_merge_kernel(spec: DecodeAttentionSpec, launch: GpuLaunch = GpuLaunch()) -> tirx.PrimFunc:
    """(acc [B,H,S,D], max [B,H,S], sum [B,H,S]) -> out [B, H, 1, D]: one block per (batch, head)."""
    H, D, NT = spec.num_heads, spec.head_dim, launch.threads
    out_dtype = spec.query_dtype

    @T.prim_func(s_tir=True)
    def gpu_decode_attention_merge(acc_handle: T.handle, max_handle: T.handle, sum_handle: T.handle,
                                   out_handle: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        B = T.int64()
        N = T.int64()
        acc_in = T.match_buffer(acc_handle, (B, H, N, D), "float32")
        max_in = T.match_buffer(max_handle, (B, H, N), "float32")
        sum_in = T.match_buffer(sum_handle, (B, H, N), "float32")
        out = T.match_buffer(out_handle, (B, H, 1, D), out_dtype)
        for work in launch.blocks(B * H):
            with T.sblock("merge"):
                T.reads()
                T.writes()
                r = T.sblock_alloc_buffer((4,), "float32", scope="local")  # max, sum, weighted value, weight
                b: T.let[T.int64] = work // H
                h: T.let[T.int64] = work % H
                for tx in launch.lanes():
                    for j in T.serial(T.int64(_ceil(D, NT))):
                        if j * NT + tx < D:
                            r[0] = T.float32(NEG_INF)
                            r[1] = T.float32(0)
                            r[2] = T.float32(0)
                            for c in T.serial(N):
                                r[0] = T.max(r[0], max_in[b, h, c])
                            for c in T.serial(N):
                                if max_in[b, h, c] != T.float32(NEG_INF):
                                    r[3] = T.exp(max_in[b, h, c] - r[0])
                                    r[1] = r[1] + sum_in[b, h, c] * r[3]
                                    r[2] = r[2] + acc_in[b, h, c, j * NT + tx] * r[3]
                            out[b, h, 0, j * NT + tx] = T.Cast(out_dtype, T.if_then_else(
                                r[1] > T.float32(0), r[2] / r[1], T.float32(0)))

    return gpu_decode_attention_merge


def prefill_kernel(spec: PrefillAttentionSpec, launch: GpuLaunch = GpuLaunch()) -> tirx.PrimFunc:
    """(q [B,H,S,D], k, v [B,K,C,D], lengths [B], k_scale, v_scale, mask) -> out [B, H, S, D]."""
    H, K, D, G = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.group_size
    TS, CH, NT, SH = spec.query_tile, spec.chunk_size, launch.threads, launch.shared
    R = G * TS  # rows per block: query head g, query i -> row g * TS + i
    if R > NT:
        raise KvcError(f"GPU prefill attention: {R} rows per block exceed {NT} threads; use a smaller query tile")
    cache_dtype, q_dtype, sm_scale = spec.cache_dtype, spec.query_dtype, spec.scale
    load = slot_loader(spec.cache_dtype, spec.scale_layout)
    RD, RCH, CHD = R * D, R * CH, CH * D
    DP = D + 1

    @T.prim_func(s_tir=True)
    def gpu_prefill_attention(q_handle: T.handle, k_handle: T.handle, v_handle: T.handle, len_handle: T.handle,
                              ks_handle: T.handle, vs_handle: T.handle, mask_handle: T.handle, out_handle: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        B = T.int64()
        S = T.int64()
        C = T.int64()
        Q = T.match_buffer(q_handle, (B, H, S, D), q_dtype)
        KC = T.match_buffer(k_handle, (B, K, C, D), cache_dtype)
        VC = T.match_buffer(v_handle, (B, K, C, D), cache_dtype)
        lengths = T.match_buffer(len_handle, (B,), "int64")
        KS = T.match_buffer(ks_handle, scale_shape(spec.scale_layout, K, B, C), "float32")
        VS = T.match_buffer(vs_handle, scale_shape(spec.scale_layout, K, B, C), "float32")
        mask = T.match_buffer(mask_handle, (B, 1, S, C) if spec.has_mask else (1, 1, 1, 1), "float32")
        out = T.match_buffer(out_handle, (B, H, S, D), q_dtype)
        for work in launch.blocks(B * K * ((S + TS - 1) // TS)):
            with T.sblock("tile"):
                T.reads()
                T.writes()
                q_sh = T.sblock_alloc_buffer((R, D), "float32", scope=SH)
                acc_sh = T.sblock_alloc_buffer((R, D), "float32", scope=SH)
                p_sh = T.sblock_alloc_buffer((R, CH), "float32", scope=SH)
                kv_sh = T.sblock_alloc_buffer((CH * DP,), "float32", scope=SH)
                m_sh = T.sblock_alloc_buffer((R,), "float32", scope=SH)
                s_sh = T.sblock_alloc_buffer((R,), "float32", scope=SH)
                alpha_sh = T.sblock_alloc_buffer((R,), "float32", scope=SH)
                reg = T.sblock_alloc_buffer((1,), "float32", scope="local")
                tiles: T.let[T.int64] = (S + TS - 1) // TS
                b: T.let[T.int64] = work // (K * tiles)
                kh: T.let[T.int64] = work // tiles % K
                s0: T.let[T.int64] = work % tiles * TS
                rows: T.let[T.int64] = T.min(S - s0, T.int64(TS))
                n_valid: T.let[T.int64] = lengths[b]
                live: T.let[T.int64] = T.max(T.min(n_valid, C), T.int64(0))
                for tx in launch.lanes():
                    for j in T.serial(T.int64(_ceil(RD, NT))):
                        if j * NT + tx < RD:
                            # min(): in bounds even past the last query (those rows are never written)
                            q_sh[(j * NT + tx) // D, (j * NT + tx) % D] = T.Cast("float32", Q[
                                b, kh * G + (j * NT + tx) // D // TS, T.min(s0 + (j * NT + tx) // D % TS, S - 1),
                                (j * NT + tx) % D]) * T.float32(sm_scale)
                            acc_sh[(j * NT + tx) // D, (j * NT + tx) % D] = T.float32(0)
                    if tx < R:
                        m_sh[tx] = T.float32(NEG_INF)
                        s_sh[tx] = T.float32(0)
                for c in T.serial((live + CH - 1) // CH):
                    start: T.let[T.int64] = c * CH
                    valid: T.let[T.int64] = T.min(live - start, T.int64(CH))
                    for tx in launch.lanes():
                        for j in T.serial(T.int64(_ceil(CHD, NT))):
                            if j * NT + tx < CHD:
                                if (j * NT + tx) // D < valid:
                                    kv_sh[((j * NT + tx) // D) * DP + (j * NT + tx) % D] = load(
                                        KC, KS, b, kh, start + (j * NT + tx) // D, (j * NT + tx) % D)
                                else:
                                    kv_sh[((j * NT + tx) // D) * DP + (j * NT + tx) % D] = T.float32(0)
                    for tx in launch.lanes():  # scores [R, CH]
                        for j in T.serial(T.int64(_ceil(RCH, NT))):
                            if j * NT + tx < RCH:
                                if (j * NT + tx) % CH < valid and (j * NT + tx) // CH % TS < rows:
                                    reg[0] = _prefill_bias(spec, mask, b, s0 + (j * NT + tx) // CH % TS,
                                                           start + (j * NT + tx) % CH, n_valid, S)
                                    for d in T.serial(T.int64(D)):
                                        reg[0] = reg[0] + q_sh[(j * NT + tx) // CH, d] * kv_sh[((j * NT + tx) % CH) * DP + d]
                                    p_sh[(j * NT + tx) // CH, (j * NT + tx) % CH] = reg[0]
                                else:
                                    p_sh[(j * NT + tx) // CH, (j * NT + tx) % CH] = T.float32(NEG_INF)
                    for tx in launch.lanes():
                        if tx < R:
                            reg[0] = m_sh[tx]
                            for t in T.serial(T.int64(CH)):
                                reg[0] = T.max(reg[0], p_sh[tx, t])
                            alpha_sh[tx] = T.if_then_else(m_sh[tx] == T.float32(NEG_INF), T.float32(0),
                                                          T.exp(m_sh[tx] - reg[0]))
                            m_sh[tx] = reg[0]
                    for tx in launch.lanes():
                        for j in T.serial(T.int64(_ceil(RCH, NT))):
                            if j * NT + tx < RCH:
                                p_sh[(j * NT + tx) // CH, (j * NT + tx) % CH] = T.if_then_else(
                                    m_sh[(j * NT + tx) // CH] == T.float32(NEG_INF), T.float32(0),
                                    T.exp(p_sh[(j * NT + tx) // CH, (j * NT + tx) % CH] - m_sh[(j * NT + tx) // CH]))
                    for tx in launch.lanes():
                        if tx < R:
                            reg[0] = s_sh[tx] * alpha_sh[tx]
                            for t in T.serial(T.int64(CH)):
                                reg[0] = reg[0] + p_sh[tx, t]
                            s_sh[tx] = reg[0]
                        for j in T.serial(T.int64(_ceil(CHD, NT))):
                            if j * NT + tx < CHD:
                                if (j * NT + tx) // D < valid:
                                    kv_sh[((j * NT + tx) // D) * DP + (j * NT + tx) % D] = load(
                                        VC, VS, b, kh, start + (j * NT + tx) // D, (j * NT + tx) % D)
                                else:
                                    kv_sh[((j * NT + tx) // D) * DP + (j * NT + tx) % D] = T.float32(0)
                    for tx in launch.lanes():
                        for j in T.serial(T.int64(_ceil(RD, NT))):
                            if j * NT + tx < RD:
                                reg[0] = acc_sh[(j * NT + tx) // D, (j * NT + tx) % D] * alpha_sh[(j * NT + tx) // D]
                                for t in T.serial(T.int64(CH)):
                                    reg[0] = reg[0] + p_sh[(j * NT + tx) // D, t] * kv_sh[(t) * DP + (j * NT + tx) % D]
                                acc_sh[(j * NT + tx) // D, (j * NT + tx) % D] = reg[0]
                for tx in launch.lanes():
                    for j in T.serial(T.int64(_ceil(RD, NT))):
                        if j * NT + tx < RD:
                            if (j * NT + tx) // D % TS < rows:
                                out[b, kh * G + (j * NT + tx) // D // TS, s0 + (j * NT + tx) // D % TS,
                                    (j * NT + tx) % D] = T.Cast(q_dtype, T.if_then_else(
                                        s_sh[(j * NT + tx) // D] > T.float32(0),
                                        acc_sh[(j * NT + tx) // D, (j * NT + tx) % D] / s_sh[(j * NT + tx) // D],
                                        T.float32(0)))

    return gpu_prefill_attention


def emit_gpu_decode_attention(bb: relax.BlockBuilder, spec: DecodeAttentionSpec, q_BH1D: relax.Expr,
                              k_BKCD: relax.Expr, v_BKCD: relax.Expr, lengths_B: relax.Expr,
                              k_scale: relax.Expr | None = None, v_scale: relax.Expr | None = None,
                              mask_B11C: relax.Expr | None = None, launch: GpuLaunch = GpuLaunch()) -> relax.Expr:
    """As kernels.decode_attention.emit_decode_attention, with the GPU kernels; [B, H, 1, D] out.
    ``spec`` as gpu_decode_spec makes it (a chunk that fits shared memory, enough splits)."""
    batch, capacity = q_BH1D.ty.shape.values[0], k_BKCD.ty.shape.values[2]
    H, D, S = spec.num_heads, spec.head_dim, spec.splits
    k_scale, v_scale = _scales(spec.scale_layout, k_scale, v_scale, batch, spec.num_kv_heads, capacity)
    mask = relax.op.astype(mask_B11C, "float32") if spec.has_mask else relax.const(np.zeros((1, 1, 1, 1), np.float32))
    partial = bb.add_func(decode_partial_kernel(spec, launch), "gpu_decode_attention_partial")
    merge = bb.add_func(decode_merge_kernel(spec, launch), "gpu_decode_attention_merge")
    parts = bb.emit(relax.call_tir(partial, [q_BH1D, k_BKCD, v_BKCD, relax.op.astype(lengths_B, "int64"), k_scale,
                                             v_scale, mask], [
        relax.TensorType([batch, H, S, D], "float32"),
        relax.TensorType([batch, H, S], "float32"),
        relax.TensorType([batch, H, S], "float32"),
    ]))
    acc, mx, sm = (bb.emit(relax.TupleGetItem(parts, i)) for i in range(3))
    return bb.emit(relax.call_tir(merge, [acc, mx, sm], relax.TensorType([batch, H, 1, D], spec.query_dtype)))


def emit_gpu_prefill_attention(bb: relax.BlockBuilder, spec: PrefillAttentionSpec, q_BHSD: relax.Expr,
                               k_BKCD: relax.Expr, v_BKCD: relax.Expr, lengths_B: relax.Expr,
                               k_scale: relax.Expr | None = None, v_scale: relax.Expr | None = None,
                               mask_B1SC: relax.Expr | None = None, launch: GpuLaunch = GpuLaunch()) -> relax.Expr:
    """As kernels.prefill_attention.emit_prefill_attention, with the GPU kernel; [B, H, S, D] out.
    ``spec`` as gpu_prefill_spec makes it (a query tile whose rows fit one block)."""
    batch, capacity = q_BHSD.ty.shape.values[0], k_BKCD.ty.shape.values[2]
    k_scale, v_scale = _scales(spec.scale_layout, k_scale, v_scale, batch, spec.num_kv_heads, capacity)
    mask = mask_B1SC if spec.has_mask else relax.const(np.zeros((1, 1, 1, 1), np.float32))
    kernel = bb.add_func(prefill_kernel(spec, launch), "gpu_prefill_attention")
    return bb.emit(relax.call_tir(kernel, [q_BHSD, k_BKCD, v_BKCD, relax.op.astype(lengths_B, "int64"),
                                           k_scale, v_scale, mask],
                                  relax.TensorType(q_BHSD.ty.shape, spec.query_dtype)))


def _scales(layout: ScaleLayout, k_scale, v_scale, batch, kv_heads: int, capacity):
    """Per-token scales as [B, K, C] (kvc's scale rings are [B, K, C, 1]); a placeholder without scales."""
    if layout is ScaleLayout.PER_TOKEN:
        return tuple(relax.op.reshape(s, [batch, kv_heads, capacity]) for s in (k_scale, v_scale))
    if layout is ScaleLayout.NONE:
        placeholder = relax.const(np.ones(1, np.float32))
        return placeholder, placeholder
    return k_scale, v_scale


def _decode_mask(spec: DecodeAttentionSpec, mask, b, slot):
    return mask[b, 0, 0, slot] if spec.has_mask else tirx.const(0, "float32")


def _prefill_bias(spec: PrefillAttentionSpec, mask, b, query, slot, n_valid, seq):
    """Additive mask value, and -inf for a slot after the query under bottom-right causality."""
    value = mask[b, 0, query, slot] if spec.has_mask else tirx.const(0, "float32")
    if not spec.causal:
        return value
    return tirx.if_then_else(slot > n_valid - seq + query, tirx.const(NEG_INF, "float32"), value)
