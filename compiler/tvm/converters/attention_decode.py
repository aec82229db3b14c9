"""kvc's decode Attention -> the flash-decoding TIR kernel (kvc.compiler.tvm.kernels.decode_attention).

Applies to the ring-buffer decode step, once the entry point pins the new-token count to 1:
  Attention(Q [B, H, 1, D], K, V [B, K, C, D], attn_mask [B|1, 1, 1, C] or none, nonpad_kv_seqlen [B])
with no past inputs, softcap, window or extra outputs (is_causal is a no-op here: the single query is
the newest position). K and V may each be read through the cache's decoder, which the kernel then does
itself, slot by slot, instead of dequantizing the whole cache first:
  DequantizeLinear(int8 / float8e4m3fn cache, scale)  scale [B, K, C, 1] blocked per token or [K] per head
  Cast(float16 cache -> float32)
Anything else returns None and the generic lowering (attention.py) is used.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import relax

from kvc.compiler.tvm.converters.common import NodeContext, Producer, dtype_of, shape_of
from kvc.compiler.tvm.kernels.decode_attention import DecodeAttentionSpec, ScaleLayout, emit_decode_attention

OP = "Attention"
QUANTIZED = ("int8", "float8_e4m3fn")


@dataclass(frozen=True)
class CacheRead:
    """How the kernel reads K or V: the stored tensor and its per-slot scales."""

    stored: relax.Expr
    scale: relax.Expr | None
    layout: ScaleLayout


def try_decode_kernel(bb: relax.BlockBuilder, inputs, attr: dict, context: NodeContext):
    """The kernel's [B, H, 1, D] output, or None when the node is not the decode pattern."""
    q, k, v, mask, past_key, past_value, nonpad = (inputs[i] for i in range(7))
    if nonpad is None or past_key is not None or past_value is not None:
        return None
    if attr["tvm_custom"]["num_outputs"] != 1 or float(attr.get("softcap", 0.0)) > 0:
        return None
    if attr.get("left_window_size", -1) >= 0 or attr.get("right_window_size", -1) >= 0:
        return None
    if dtype_of(q) not in ("float32", "float16") or len(shape_of(q, OP)) != 4:
        return None
    batch, heads, q_len, head_dim = shape_of(q, OP)
    if not all(isinstance(d, int) for d in (q_len, heads, head_dim)) or q_len != 1:
        return None
    reads = [_cache_read(x, context.producer(i)) for i, x in ((1, k), (2, v))]
    if any(r is None for r in reads) or len({(dtype_of(r.stored), r.layout) for r in reads}) != 1:
        return None
    k_read, v_read = reads
    k_dims, v_dims = shape_of(k_read.stored, OP), shape_of(v_read.stored, OP)
    _, kv_heads, capacity, k_head_dim = k_dims
    if not all(_same(a, b) for a, b in zip(k_dims, v_dims)) or not isinstance(kv_heads, int) \
            or heads % kv_heads or not _same(k_head_dim, head_dim):
        return None
    mask_B11C = _decode_mask(bb, mask, batch, capacity)
    if mask is not None and mask_B11C is None:
        return None
    spec = DecodeAttentionSpec(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                               cache_dtype=dtype_of(k_read.stored), scale_layout=k_read.layout,
                               query_dtype=dtype_of(q), has_mask=mask is not None, chunk_size=context.decode_chunk_size,
                               softmax_scale=attr.get("scale"))
    return emit_decode_attention(bb, spec, q, k_read.stored, v_read.stored, nonpad, k_read.scale, v_read.scale,
                                 mask_B11C)


def _cache_read(x: relax.Expr, producer: Producer | None) -> CacheRead | None:
    if len(shape_of(x, OP)) != 4:
        return None
    if producer is not None and producer.op_type == "DequantizeLinear":
        return _dequantized_read(x, producer)
    if producer is not None and producer.op_type == "Cast" and dtype_of(producer.inputs[0]) == "float16" \
            and dtype_of(x) == "float32":
        return CacheRead(producer.inputs[0], None, ScaleLayout.NONE)
    if dtype_of(x) in ("float32", "float16"):
        return CacheRead(x, None, ScaleLayout.NONE)
    return None


def _dequantized_read(x: relax.Expr, producer: Producer) -> CacheRead | None:
    stored, scale, zero_point = (producer.inputs + [None, None, None])[:3]
    if zero_point is not None or dtype_of(stored) not in QUANTIZED or dtype_of(x) != "float32":
        return None
    if dtype_of(scale) != "float32":
        return None
    dims, scale_dims = shape_of(stored, OP), shape_of(scale, OP)
    axis = producer.attrs.get("axis", 1) % 4
    block = producer.attrs.get("block_size", 0)
    if block and axis == 3 and block == dims[3] and len(scale_dims) == 4 and scale_dims[3] == 1:
        return CacheRead(stored, scale, ScaleLayout.PER_TOKEN)
    if not block and axis == 1 and len(scale_dims) == 1:
        return CacheRead(stored, scale, ScaleLayout.PER_HEAD)
    return None


def _decode_mask(bb, mask: relax.Expr | None, batch, capacity):
    """attn_mask as a float32 additive [B, 1, 1, C], or None if it has another shape."""
    if mask is None:
        return None
    dims = shape_of(mask, OP)
    if len(dims) > 4 or not _same(dims[-1], capacity) or any(d != 1 for d in dims[-3:-1] if isinstance(d, int)):
        return None
    if any(not isinstance(d, int) for d in dims[-3:-1]):
        return None
    additive = mask
    if dtype_of(mask) == "bool":
        additive = relax.op.where(mask, relax.const(np.float32(0)), relax.const(np.float32(-np.inf)))
    elif dtype_of(mask) != "float32":
        additive = relax.op.astype(mask, "float32")
    full_rank = relax.op.reshape(additive, [1] * (4 - len(dims)) + dims) if len(dims) < 4 else additive
    return bb.emit(relax.op.broadcast_to(full_rank, [batch, 1, 1, capacity]))


def _same(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return not isinstance(a, int) and not isinstance(b, int) and a.same_as(b)
