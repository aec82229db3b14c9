"""ONNX ``RMSNormalization`` (opset 23) -> Relax: Y = X / sqrt(mean(X^2 over axis..last) + epsilon) * Scale.

TVM's own converter maps to ``relax.op.nn.rms_norm``, which fails to build when the normalized axes
cover the whole tensor (axis 0). That op is kept where it works (GPU schedules know it); otherwise
the formula is spelled out. stash_type=1 computes in float32, as the spec asks.
"""
from __future__ import annotations

from tvm import relax
from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

from kvc.compiler.tvm.converters.common import dtype_of, positive_axis, scalar, shape_of
from kvc.errors import GraphError

OP = "RMSNormalization"
op = relax.op


class RMSNormalization(OnnxOpConverter):
    @classmethod
    def _impl_v23(cls, bb, inputs, attr, params):
        x, weight = inputs[0], inputs[1]
        rank = len(shape_of(x, OP))
        axis = positive_axis(attr.get("axis", -1), rank, OP)
        epsilon = float(attr.get("epsilon", 1e-5))
        stash_type = attr.get("stash_type", 1)
        if stash_type not in (0, 1):
            raise GraphError(f"{OP}: stash_type={stash_type} is not supported (use 1: float32)")
        dtype = dtype_of(x)
        compute = "float32" if stash_type == 1 else dtype
        x_c, w_c = (op.astype(t, compute) if dtype_of(t) != compute else t for t in (x, weight))
        axes = list(range(axis, rank))
        if axis > 0 and len(shape_of(weight, OP)) == len(axes):
            y = op.nn.rms_norm(x_c, w_c, axes, epsilon)
        else:
            mean_square = op.mean(op.multiply(x_c, x_c), axis=axes, keepdims=True)
            y = op.multiply(op.multiply(x_c, op.rsqrt(op.add(mean_square, scalar(epsilon, compute)))), w_c)
        return op.astype(y, dtype) if compute != dtype else y
