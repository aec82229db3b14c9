"""ONNX ``QuantizeLinear`` / ``DequantizeLinear`` (opset 10..24) -> Relax, per tensor, per axis and blocked.

kvc's int8 / fp8 KV caches use the blocked form (scale [B, K, C, 1], block = one token's head_dim),
which TVM's own converter refuses, so all three forms go through one elementwise lowering here:
the scale (and zero point) are broadcast to the input's shape, then
  quantize    y = saturate(round_half_even(x / scale) + zero_point)   integers
              y = float8(x / scale), round to nearest even, saturate or not    float8
  dequantize  y = (float(x) - float(zero_point)) * scale
float8 goes through kvc.compiler.tvm.kernels.float8: TVM's own float8 casts are wrong near zero.
"""
from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

from kvc.compiler.tvm.converters.common import dtype_of, onnx_dtype_name, positive_axis, shape_of, simplify_dim
from kvc.compiler.tvm.kernels import float8
from kvc.errors import GraphError

op = relax.op
INTEGER_TYPES = ("int8", "uint8", "int16", "uint16", "int32", "uint32")
FLOAT8_TYPES = ("float8_e4m3fn", "float8_e5m2")


class QuantizeLinear(OnnxOpConverter):
    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        x, scale, zero_point = inputs[0], inputs[1], inputs[2]
        name = "QuantizeLinear"
        out_dtype = _quantized_dtype(attr, zero_point, name)
        precision = attr.get("precision", 0)
        compute = onnx_dtype_name(precision) if precision else dtype_of(scale)
        scale_b = _broadcast_like(bb, scale, x, attr, name)
        ratio = op.divide(_cast(bb, x, compute), _cast(bb, scale_b, compute))
        if out_dtype in FLOAT8_TYPES:
            return float8.emit_encode(bb, bb.normalize(ratio), out_dtype, saturate=bool(attr.get("saturate", 1)))
        info = np.iinfo(out_dtype)
        shifted = op.round(ratio)
        if zero_point is not None:
            shifted = op.add(shifted, _cast(bb, _broadcast_like(bb, zero_point, x, attr, name), compute))
        return op.astype(op.clip(shifted, int(info.min), int(info.max)), out_dtype)


class DequantizeLinear(OnnxOpConverter):
    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        x, scale, zero_point = inputs[0], inputs[1], inputs[2]
        name = "DequantizeLinear"
        in_dtype = dtype_of(x)
        if in_dtype not in INTEGER_TYPES + FLOAT8_TYPES:
            raise GraphError(f"{name}: input type {in_dtype} is not supported ({INTEGER_TYPES + FLOAT8_TYPES})")
        output_dtype = attr.get("output_dtype", 0)
        out_dtype = onnx_dtype_name(output_dtype) if output_dtype else dtype_of(scale)
        value = float8.emit_decode(bb, x) if in_dtype in FLOAT8_TYPES else _cast(bb, x, "float32")
        if zero_point is not None:
            value = op.subtract(value, _to_float32(bb, _broadcast_like(bb, zero_point, x, attr, name)))
        return _cast(bb, op.multiply(value, _cast(bb, _broadcast_like(bb, scale, x, attr, name), "float32")), out_dtype)


def _quantized_dtype(attr: dict, zero_point, name: str) -> str:
    output_dtype = attr.get("output_dtype", 0)
    if output_dtype:
        dtype = onnx_dtype_name(output_dtype)
    else:
        dtype = dtype_of(zero_point) if zero_point is not None else "uint8"
    if zero_point is not None and dtype_of(zero_point) != dtype:
        raise GraphError(f"{name}: output_dtype {dtype} differs from the zero point's {dtype_of(zero_point)}")
    if dtype not in INTEGER_TYPES + FLOAT8_TYPES:
        raise GraphError(f"{name}: output type {dtype} is not supported ({INTEGER_TYPES + FLOAT8_TYPES})")
    return dtype


def _broadcast_like(bb, param: relax.Expr, x: relax.Expr, attr: dict, name: str) -> relax.Expr:
    """A scale or zero point reshaped/repeated so that it broadcasts elementwise against x."""
    x_dims = shape_of(x, name)
    p_dims = shape_of(param, name)
    rank = len(x_dims)
    block = attr.get("block_size", 0)
    if len(p_dims) == 0 or (len(p_dims) == 1 and p_dims[0] == 1 and not block):
        return param  # per tensor
    axis = positive_axis(attr.get("axis", 1) if rank > 1 else 0, rank, name)
    if not block:  # per axis: 1-D along axis
        if len(p_dims) != 1:
            raise GraphError(f"{name}: a per-axis scale must be 1-D, got rank {len(p_dims)}")
        return op.reshape(param, [p_dims[0] if a == axis else 1 for a in range(rank)])
    if len(p_dims) != rank:
        raise GraphError(f"{name}: a blocked scale must have the input's rank {rank}, got {len(p_dims)}")
    if p_dims[axis] == 1:
        return param  # one block spans the axis: plain broadcasting
    repeated = op.repeat(param, block, axis=axis)
    if _is_zero(simplify_dim(p_dims[axis] * block - x_dims[axis])):
        return repeated
    return op.strided_slice(repeated, axes=[axis], begin=[0], end=[x_dims[axis]], assume_inbound=True)


def _to_float32(bb, x: relax.Expr) -> relax.Expr:
    x = bb.normalize(x)
    return float8.emit_decode(bb, x) if dtype_of(x) in FLOAT8_TYPES else _cast(bb, x, "float32")


def _is_zero(dim) -> bool:
    return isinstance(dim, int) and dim == 0


def _cast(bb, x: relax.Expr, dtype: str) -> relax.Expr:
    x = bb.normalize(x)
    return x if dtype_of(x) == dtype else op.astype(x, dtype)
