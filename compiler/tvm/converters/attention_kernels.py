"""ai.kvc CacheAttention -> kvc's TIR kernels (kvc.compiler.tvm.kernels): the CPU kernels on llvm, their
GPU variants (kernels.gpu_attention) on CUDA.

CacheAttention is the ring-buffer Attention with the caches as stored (kvc.passes.lower_tvm_cache_attention
wrote it): Q [B, H, S, D]; K, V [B, K, C, D] in float32 / float16 / int8 / float8e4m3fn, decoded by
the kernels themselves, slot by slot (scales [B, K, C, 1] per token or [K] per head); attn_mask
[B|1, 1, S|1, C] or none; nonpad_kv_seqlen [B]. S = 1 known at import (the decode entry point) takes
the flash-decoding kernel (is_causal is a no-op there: the single query is the newest position); any
other S the prefill kernel (is_causal bottom-right, as ONNX defines it with nonpad_kv_seqlen). Shapes
the kernels do not take (symbolic heads, a per-head mask, ...) return None: the converter then
decodes and attends with the generic lowering.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import relax

from kvc.compiler.tvm.converters.common import NodeContext, dtype_of, shape_of, simplify_dim
from kvc.compiler.tvm.kernels import gpu_attention
from kvc.compiler.tvm.kernels.decode_attention import DecodeAttentionSpec, emit_decode_attention
from kvc.compiler.tvm.kernels.kv_read import ScaleLayout
from kvc.compiler.tvm.kernels.prefill_attention import PrefillAttentionSpec, emit_prefill_attention
from kvc.errors import KvcError

OP = "CacheAttention"


@dataclass(frozen=True)
class CacheRead:
    """How the kernel reads K or V: the stored tensor and its per-slot scales."""

    stored: relax.Expr
    scale: relax.Expr | None
    layout: ScaleLayout


def try_attention_kernel(bb: relax.BlockBuilder, q: relax.Expr, k_read: CacheRead, v_read: CacheRead,
                         mask: relax.Expr | None, nonpad: relax.Expr, attr: dict, context: NodeContext):
    """The kernel's [B, H, S, D] output, or None when the shapes are not ones the kernels take."""
    if dtype_of(q) not in ("float32", "float16") or len(shape_of(q, OP)) != 4:
        return None
    batch, heads, q_len, head_dim = shape_of(q, OP)
    if not isinstance(heads, int) or not isinstance(head_dim, int):
        return None
    k_dims, v_dims = shape_of(k_read.stored, OP), shape_of(v_read.stored, OP)
    _, kv_heads, capacity, k_head_dim = k_dims
    if not all(_same(a, b) for a, b in zip(k_dims, v_dims)) or not isinstance(kv_heads, int) \
            or heads % kv_heads or not _same(k_head_dim, head_dim):
        return None
    decode = isinstance(q_len, int) and q_len == 1
    mask_B1SC = _kernel_mask(bb, mask, batch, q_len, capacity)
    if mask is not None and mask_B1SC is None:
        return None
    common = dict(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, cache_dtype=dtype_of(k_read.stored),
                  scale_layout=k_read.layout, query_dtype=dtype_of(q), has_mask=mask is not None,
                  chunk_size=context.kernel_chunk_size, softmax_scale=attr.get("scale"),
                  hardware_half=context.hardware_half)
    if decode:
        spec, emit = DecodeAttentionSpec(**common, avx512_int16=context.avx512_int16), emit_decode_attention
    else:
        spec, emit = PrefillAttentionSpec(**common, causal=bool(attr.get("is_causal", 0)),
                                          query_tile=context.prefill_query_tile), emit_prefill_attention
    if context.gpu_attention_kernels:
        try:
            spec, emit = gpu_attention.for_gpu(spec)
        except KvcError:  # heads x head size beyond one thread block: the generic lowering
            return None
    return emit(bb, spec, q, k_read.stored, v_read.stored, nonpad, k_read.scale, v_read.scale, mask_B1SC)


def _kernel_mask(bb, mask: relax.Expr | None, batch, q_len, capacity):
    """attn_mask as float32 additive [B, 1, S, C], or None if it has another shape (e.g. per head)."""
    if mask is None:
        return None
    dims = shape_of(mask, OP)
    if len(dims) > 4 or not _same(dims[-1], capacity):
        return None
    full = [1] * (4 - len(dims)) + dims
    if not (isinstance(full[1], int) and full[1] == 1) or not _batch_like(full[0], batch) \
            or not _batch_like(full[2], q_len):
        return None
    additive = mask
    if dtype_of(mask) == "bool":
        additive = relax.op.where(mask, relax.const(np.float32(0)), relax.const(np.float32(-np.inf)))
    elif dtype_of(mask) != "float32":
        additive = relax.op.astype(mask, "float32")
    additive = bb.emit(relax.op.reshape(additive, full)) if len(dims) < 4 else bb.emit(additive)
    if not _same(full[2], q_len) and not (isinstance(full[2], int) and full[2] == 1):
        # a query dim TVM cannot relate to Q's (e.g. computed with Range): checked at run time
        additive = bb.match_cast(additive, relax.TensorType([full[0], 1, q_len, capacity], "float32"))
    return bb.emit(relax.op.broadcast_to(additive, [batch, 1, q_len, capacity]))


def _batch_like(dim, wanted) -> bool:
    """dim is 1, equal to wanted, or symbolic (equality then checked at run time)."""
    return (isinstance(dim, int) and (dim == 1 or _same(dim, wanted))) or not isinstance(dim, int)


def _same(a, b) -> bool:
    """Provably equal dims."""
    difference = simplify_dim(a - b) if not (isinstance(a, int) and isinstance(b, int)) else a - b
    return isinstance(difference, int) and difference == 0
