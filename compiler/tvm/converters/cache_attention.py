"""ai.kvc ``CacheAttention`` -> Relax: kvc's attention kernels, or decode-then-attend.

CacheAttention(Q, K stored, V stored, attn_mask?, nonpad_kv_seqlen, K scale?, V scale?) with
Attention's attributes plus ``scale_layout`` means exactly
  Attention(Q, decode(K), decode(V), attn_mask, nonpad_kv_seqlen=nonpad_kv_seqlen)
where decode is the cache codec kvc.passes.lower_tvm_cache_attention found (per-token or per-head
scales for int8 / float8e4m3fn, a cast for float16 under a float32 query, nothing for float32).
On llvm and CUDA kvc's kernels decode inside attention (attention_kernels.py; CPU or GPU kernels);
with kernels off, or for shapes the kernels do not take, the caches are decoded here and attention is
the standard lowering.
"""
from __future__ import annotations

from tvm import relax
from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

from kvc.compiler.tvm.converters.attention import AttentionAttrs, AttentionInputs, lower_attention
from kvc.compiler.tvm.converters.attention_kernels import CacheRead, try_attention_kernel
from kvc.compiler.tvm.converters.common import CONTEXT_KEY, dtype_of
from kvc.compiler.tvm.kernels import float8
from kvc.compiler.tvm.kernels.kv_read import ScaleLayout
from kvc.errors import GraphError

OP = "CacheAttention"
op = relax.op


class CacheAttention(OnnxOpConverter):
    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        q, k, v, mask, nonpad = (inputs[i] for i in range(5))
        k_scale, v_scale = (inputs[i] if len(inputs) > i else None for i in (5, 6))
        layout = ScaleLayout(_text(attr.get("scale_layout", "none")))
        if nonpad is None or (layout is ScaleLayout.NONE) != (k_scale is None and v_scale is None):
            raise GraphError(f"{OP}: needs nonpad_kv_seqlen, and scales exactly when scale_layout is not 'none'")
        k_read, v_read = CacheRead(k, k_scale, layout), CacheRead(v, v_scale, layout)
        context = attr.get(CONTEXT_KEY)
        if context is not None and (context.attention_kernels or context.gpu_attention_kernels):
            y = try_attention_kernel(bb, q, k_read, v_read, mask, nonpad, attr, context)
            if y is not None:
                return y
        query_dtype = dtype_of(q)
        ins = AttentionInputs(q, _decoded(bb, k_read, query_dtype), _decoded(bb, v_read, query_dtype), mask,
                              None, None, nonpad)
        return lower_attention(bb, ins, AttentionAttrs.parse(attr))[0]


def _decoded(bb, read: CacheRead, query_dtype: str) -> relax.Expr:
    """The cache as the replaced Attention read it: float32 after a scale, else the query's dtype."""
    stored = read.stored
    if read.layout is ScaleLayout.NONE:
        return stored if dtype_of(stored) == query_dtype else bb.emit(op.astype(stored, query_dtype))
    values = float8.emit_decode(bb, stored) if dtype_of(stored) == "float8_e4m3fn" else op.astype(stored, "float32")
    scale = read.scale
    if read.layout is ScaleLayout.PER_HEAD:  # [K] -> [1, K, 1, 1]
        scale = op.reshape(scale, [1, -1, 1, 1])
    return bb.emit(op.multiply(values, scale))


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
