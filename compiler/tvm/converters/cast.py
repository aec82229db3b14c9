"""ONNX ``Cast`` -> Relax, with exact float8 conversions (kvc.compiler.tvm.kernels.float8).

TVM 0.27's ``astype`` to and from float8 is wrong for zero, subnormals and NaN, and kvc's fp8 KV cache
casts fp8 <-> fp16 around TensorScatter; every other cast is TVM's own converter.
"""
from __future__ import annotations

from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

from kvc.compiler.tvm.converters.common import dtype_of, onnx_dtype_name
from kvc.compiler.tvm.kernels import float8

OP = "Cast"


class Cast(tvm_onnx.Cast):
    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        x = inputs[0]
        to = onnx_dtype_name(attr["to"])
        source = dtype_of(x) if isinstance(x, relax.Expr) and isinstance(x.ty, relax.TensorType) else None
        if to not in float8.FORMATS and source not in float8.FORMATS:
            return super()._impl_v13(bb, inputs, attr, params)
        if to in float8.FORMATS:
            if source in float8.FORMATS:
                x = float8.emit_decode(bb, x)
            return float8.emit_encode(bb, x, to, saturate=bool(attr.get("saturate", 1)))
        return float8.emit_decode(bb, x, to)
