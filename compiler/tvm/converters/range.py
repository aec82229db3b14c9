"""ONNX ``Range`` -> Relax ``arange`` when its bounds are constants or symbolic dims.

A decoder computes its query positions as Range(0, Squeeze(Shape(K)[2]), 1). TVM's converter turns a
symbolic bound into a tensor and reads the length back as a fresh variable, so the positions lose
their tie to the sequence dim, and the CUDA build then fails ("... has not been computed"). Here
such a Range keeps the dim as its length; bounds that are real tensors go to TVM's converter.
"""
from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx


class Range(tvm_onnx.Range):
    @classmethod
    def _impl_v12(cls, bb, inputs, attr, params):
        bounds = [_number_or_dim(x) for x in inputs[:3]]
        dtype = _dtype(inputs[0])
        symbolic = any(tvm.ir.is_prim_expr(b) for b in bounds)
        if any(b is None for b in bounds) or not symbolic or not dtype.startswith("int"):
            return super()._impl_v12(bb, inputs, attr, params)  # tensor bounds, all constants, or floats
        start, limit, delta = (_as_int64(b) for b in bounds)
        return relax.op.arange(start, limit, delta, dtype)


def _number_or_dim(x):
    """A Python number for a constant scalar, the expression for a symbolic dim, else None."""
    if isinstance(x, tvm.ir.GenericConst):
        return x.value.numpy().item() if x.value.numpy().size == 1 else None
    return x if tvm.ir.is_prim_expr(x) else None


def _dtype(x) -> str:
    if isinstance(x, tvm.ir.GenericConst):
        return str(x.value.numpy().dtype)
    return str(x.ty) if tvm.ir.is_prim_expr(x) else str(x.ty.dtype)


def _as_int64(value):
    if tvm.ir.is_prim_expr(value) and str(value.ty) != "int64":
        return tvm.tirx.Cast("int64", value)
    return value
