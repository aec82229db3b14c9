"""ONNX ``TensorScatter`` (opset 24) -> Relax: write ``update`` into ``past_cache`` along ``axis`` at
``write_indices[b]`` (batch = dim 0), ``linear`` or ``circular`` (the ring-buffer KV cache update).

Each output slot c of batch b takes the update row written there last, else the past value:
  linear    j = c - w[b], written when 0 <= j < S
  circular  j = S - 1 - ((w[b] + S - 1 - c) mod C), written when j >= 0 (the last of several wraps wins)
The result is a new tensor (functional), so the graph stays correct whoever else reads the past cache;
the TVM engine build swaps in an in-place writer where it is safe (kvc.compiler.tvm.inplace).
"""
from __future__ import annotations

from tvm import te, tirx
from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

from kvc.compiler.tvm.converters.common import positive_axis, shape_of
from kvc.errors import GraphError

OP = "TensorScatter"
MODES = ("linear", "circular")


def scatter_mode(attr: dict) -> str:
    """The node's mode attribute as text ("linear" when absent); unknown modes are refused."""
    mode = attr.get("mode", b"linear")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode not in MODES:
        raise GraphError(f"{OP}: mode '{mode}' is not one of {MODES}")
    return mode


class TensorScatter(OnnxOpConverter):
    @classmethod
    def _impl_v24(cls, bb, inputs, attr, params):
        past, update, write_indices = inputs[0], inputs[1], inputs[2]
        mode = scatter_mode(attr)
        rank = len(shape_of(past, OP))
        if len(shape_of(update, OP)) != rank:
            raise GraphError(f"{OP}: update has rank {len(shape_of(update, OP))}, past_cache rank {rank}")
        axis = positive_axis(attr.get("axis", -2), rank, OP)
        if axis == 0:
            raise GraphError(f"{OP}: axis 0 is the batch axis that write_indices index; use axis >= 1")
        return bb.emit_te(_scatter_te, past, update, write_indices, axis, mode,
                          primfunc_name_hint=f"tensor_scatter_{mode}")


def _scatter_te(past: te.Tensor, update: te.Tensor, write_indices: te.Tensor | None, axis: int, mode: str):
    capacity, seq = past.shape[axis], update.shape[axis]

    def slot(*index):
        c = index[axis]
        w = write_indices[index[0]].astype("int64") if write_indices is not None else tirx.const(0, "int64")
        if mode == "linear":
            j = c - w
            written = tirx.all(j >= 0, j < seq)
        else:
            j = seq - 1 - tirx.floormod(w + seq - 1 - c, capacity)
            written = j >= 0
        safe_j = tirx.max(tirx.min(j, seq - 1), 0)  # in bounds even where not written
        src = (*index[:axis], safe_j, *index[axis + 1:])
        return tirx.if_then_else(written, update[src], past[index])

    return te.compute(past.shape, slot, name="present_cache")
