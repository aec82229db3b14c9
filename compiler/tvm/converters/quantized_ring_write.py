"""ai.kvc ``QuantizedRingWrite`` -> one in-place TIR kernel per cache (kvc.passes.lower_tvm_quantized_writes).

QuantizedRingWrite(codes ring, scale ring, X, write_index) -> (codes ring, scale ring) means exactly what the
quantize pass wrote for an int8 / dynamic-fp8 cache (kvc.passes.kv_codec):
  scale = max |X| over head_dim / qmax per token per kv head (0 -> 1)
  codes ring[b, k, (write_index[b] + s) mod C, :] = quantize(X[b, k, s, :] / scale)   (int8: round half to even,
                                                                                       saturate; e4m3fn: saturate)
  scale ring[b, k, (write_index[b] + s) mod C, 0] = scale
As standard ops that is five kernels per cache (absolute max, scale, codes, two ring writes), each a VM call
and most a thread-pool dispatch, per layer and step: at batch 1 and a short context an int8 cache decoded
slower than fp32 for that alone. Here one kernel writes both rings in place; a decode step (one token) runs
it on the calling thread, longer chunks parallel over their tokens.
"""
from __future__ import annotations

import functools

from onnx import TensorProto
from tvm import relax, tirx
from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter
from tvm.script import tirx as T

from kvc.compiler.tvm.converters.common import CONTEXT_KEY, dtype_of, shape_of
from kvc.compiler.tvm.converters.quantize import QuantizeLinear
from kvc.compiler.tvm.inplace import InPlaceTensorScatter
from kvc.compiler.tvm.kernels import float8
from kvc.errors import GraphError
from kvc.passes.kv_codec import FP8_E4M3_MAX, INT8_MAX

OP = "QuantizedRingWrite"
QMAX = {"int8": INT8_MAX, "float8_e4m3fn": FP8_E4M3_MAX}
_ONNX_TYPE = {"int8": TensorProto.INT8, "float8_e4m3fn": TensorProto.FLOAT8E4M3FN}


def _encode(ratio, dtype: str):
    """The stored code of a float32 ratio (x / scale)."""
    if dtype == "int8":
        return T.Cast("int8", T.max(T.min(T.round(ratio), T.float32(127)), T.float32(-128)))
    return tirx.reinterpret(dtype, float8.encode_bits(ratio, float8.E4M3FN, saturate=True))


@functools.lru_cache(maxsize=None)
def quantized_ring_write_kernel(heads: int, capacity: int, head_dim: int, dtype: str, x_dtype: str):
    qmax = QMAX[dtype]

    @T.macro
    def write_token(codes, scales, x, write_indices, b, h, s, amax):
        amax[0] = T.float32(0)
        for d in T.serial(T.int64(head_dim)):
            amax[0] = T.max(amax[0], T.abs(T.Cast("float32", x[b, h, s, d])))
        amax[0] = amax[0] / T.float32(qmax)
        amax[0] = T.if_then_else(amax[0] == T.float32(0), T.float32(1), amax[0])  # the scale: all-zero -> 1
        slot: T.let[T.int64] = T.floormod(write_indices[b] + s, T.int64(capacity))
        scales[b, h, slot, 0] = amax[0]
        for d in T.vectorized(T.int64(head_dim)):
            codes[b, h, slot, d] = _encode(T.Cast("float32", x[b, h, s, d]) / amax[0], dtype)

    @T.prim_func(private=True, s_tir=True)
    def quantized_ring_write(var_codes: T.handle, var_scales: T.handle, var_x: T.handle, var_write_indices: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        batch, seq = T.int64(), T.int64()
        codes = T.match_buffer(var_codes, (batch, heads, capacity, head_dim), dtype)
        scales = T.match_buffer(var_scales, (batch, heads, capacity, 1), "float32")
        x = T.match_buffer(var_x, (batch, heads, seq, head_dim), x_dtype)
        write_indices = T.match_buffer(var_write_indices, (batch,), "int64")
        if seq == T.int64(1):  # decode: a few hundred values, not worth a thread-pool dispatch
            for row in T.serial(batch * heads):
                with T.sblock("token"):
                    T.reads()
                    T.writes()
                    amax = T.sblock_alloc_buffer((1,), "float32")
                    write_token(codes, scales, x, write_indices, row // heads, row % heads, T.int64(0), amax)
        else:
            for row in T.parallel(batch * heads * seq):
                with T.sblock("chunk_token"):
                    T.reads()
                    T.writes()
                    amax = T.sblock_alloc_buffer((1,), "float32")
                    write_token(codes, scales, x, write_indices, row // (heads * seq), row // seq % heads,
                                row % seq, amax)

    return quantized_ring_write


class QuantizedRingWrite(OnnxOpConverter):
    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        codes, scales, x, write_indices = (inputs[i] for i in range(4))
        dtype = dtype_of(codes)
        if dtype not in QMAX or dtype_of(scales) != "float32" or dtype_of(x) not in ("float32", "float16"):
            raise GraphError(f"{OP}: takes an int8 or float8e4m3fn ring, float32 scales and float32/16 values; "
                             f"got {dtype}, {dtype_of(scales)}, {dtype_of(x)}")
        dims = shape_of(codes, OP)
        if len(dims) != 4 or not all(isinstance(d, int) for d in dims[1:]):
            raise GraphError(f"{OP}: the ring needs static [batch, kv_heads, capacity, head_dim], got {dims}")
        heads, capacity, head_dim = dims[1:]
        context = attr.get(CONTEXT_KEY)
        cpu_kernels = context is not None and context.attention_kernels  # llvm, kvc's kernels on
        if not (cpu_kernels and isinstance(codes, relax.Var) and isinstance(scales, relax.Var)):
            return _standard_ops(bb, codes, scales, x, write_indices)
        kernel = quantized_ring_write_kernel(heads, capacity, head_dim, dtype, dtype_of(x))
        gvar = bb.add_func(kernel, f"quantized_ring_write_{dtype}_{heads}x{capacity}x{head_dim}")
        return relax.call_tir_inplace(gvar, [codes, scales, x, write_indices], inplace_indices=[0, 1],
                                      out_ty=[codes.ty, scales.ty])


def _standard_ops(bb, codes, scales, x, write_indices):
    """The same meaning from standard ops, where the CPU kernel does not apply (CUDA: the GPU schedules take the
    ops; a functional import: new rings). The ring writes stay in place where the rings are parameters."""
    op = relax.op
    scale = op.divide(op.max(op.abs(op.astype(x, "float32")), axis=[-1], keepdims=True),
                      relax.const(QMAX[dtype_of(codes)], "float32"))
    scale = bb.emit(op.where(op.equal(scale, relax.const(0.0, "float32")), relax.const(1.0, "float32"), scale))
    quantize_attr = {"axis": 3, "block_size": shape_of(x, OP)[3], "output_dtype": _ONNX_TYPE[dtype_of(codes)]}
    quantized = bb.emit(QuantizeLinear._impl_v10(bb, [x, scale, None], quantize_attr, None))
    ring = {"mode": b"circular", "axis": 2}
    return relax.Tuple([bb.emit(InPlaceTensorScatter._impl_v24(bb, [codes, quantized, write_indices], ring, None)),
                        bb.emit(InPlaceTensorScatter._impl_v24(bb, [scales, scale, write_indices], ring, None))])
