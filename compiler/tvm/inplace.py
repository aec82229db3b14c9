"""In-place ring-buffer update for the TVM engine: TensorScatter(mode="circular") on a cache that
is a function parameter becomes ``call_tir_inplace`` of a kernel that writes only the new rows.

The functional converter (kvc.compiler.tvm.converters.tensor_scatter) builds a whole new cache
tensor every step; here the VM hands the caller's cache buffer to the kernel and returns it as
the output (no allocation, no copy). Safe because the compiler checked that the scatter is the
cache input's only reader (compiler.ort_build.in_place_aliases).
"""
from __future__ import annotations

import functools

from tvm import relax
from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter
from tvm.script import tirx as T

from kvc.compiler.tvm.converters.tensor_scatter import TensorScatter, scatter_mode


@functools.lru_cache(maxsize=None)
def circular_scatter_kernel(heads: int, capacity: int, head_dim: int, dtype: str):
    """cache[b, h, (w[b] + s) mod C, d] = update[b, h, s, d]; batch and seq are symbolic."""

    @T.prim_func(private=True, s_tir=True)
    def ring_write(var_cache: T.handle, var_update: T.handle, var_write_indices: T.handle):
        T.func_attr({"tirx.noalias": True})
        batch, seq = T.int64(), T.int64()
        cache = T.match_buffer(var_cache, (batch, heads, capacity, head_dim), dtype)
        update = T.match_buffer(var_update, (batch, heads, seq, head_dim), dtype)
        write_indices = T.match_buffer(var_write_indices, (batch,), "int64")
        for b, h, s, d in T.grid(batch, heads, seq, head_dim):
            with T.sblock("ring_write"):
                vb, vh, vs, vd = T.axis.remap("SSSS", [b, h, s, d])
                cache[vb, vh, T.floormod(write_indices[vb] + vs, capacity), vd] = update[vb, vh, vs, vd]

    return ring_write


class InPlaceTensorScatter(OnnxOpConverter):
    """TensorScatter converter that updates a 4-D circular cache parameter in place."""

    @classmethod
    def _impl_v24(cls, bb, inputs, attr, params):
        past, update, write_indices = inputs[0], inputs[1], inputs[2]
        mode = scatter_mode(attr)
        axis = attr.get("axis", -2)
        shape = past.ty.shape if isinstance(past.ty, relax.TensorType) else None
        if (mode != "circular" or write_indices is None or not isinstance(past, relax.Var)
                or shape is None or len(shape) != 4 or axis not in (-2, 2)
                or not all(isinstance(getattr(d, "value", None), int) for d in list(shape)[1:])):
            return TensorScatter._impl_v24(bb, inputs, attr, params)  # not a ring cache: functional form
        heads, capacity, head_dim = (int(d.value) for d in list(shape)[1:])
        kernel = circular_scatter_kernel(heads, capacity, head_dim, past.ty.dtype)
        gvar = bb.add_func(kernel, f"ring_write_{past.ty.dtype}_{heads}x{capacity}x{head_dim}")
        return relax.call_tir_inplace(gvar, [past, update, write_indices], inplace_indices=[0], out_ty=past.ty)
