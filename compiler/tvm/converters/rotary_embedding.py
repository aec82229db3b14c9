"""ONNX ``RotaryEmbedding`` (opset 23) -> Relax, following onnx.reference's ``rotary_embedding``.

Input [B, H, S, D] (4-D) or [B, S, H*D] with num_heads (3-D). cos/sin caches are [P, R/2] indexed by
position_ids [B, S], or already [B, S, R/2] when position_ids is absent. The first R =
rotary_embedding_dim (default D) features rotate, as two halves (x1 = x[:R/2], x2 = x[R/2:]) or as
interleaved pairs (x1 = x[0::2], x2 = x[1::2]); the rest pass through.
"""
from __future__ import annotations

from tvm import relax
from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

from kvc.compiler.tvm.converters.common import CONTEXT_KEY, shape_of, static_dim
from kvc.errors import GraphError

OP = "RotaryEmbedding"
op = relax.op


class RotaryEmbedding(OnnxOpConverter):
    @classmethod
    def _impl_v23(cls, bb, inputs, attr, params):
        x, cos, sin, position_ids = inputs[0], inputs[1], inputs[2], inputs[3]
        dims = shape_of(x, OP)
        if len(dims) == 3:
            heads = attr.get("num_heads", 0)
            if not heads:
                raise GraphError(f"{OP}: a 3-D input needs the num_heads attribute")
            hidden = static_dim(dims[2], OP, "the hidden size")
            if hidden % heads:
                raise GraphError(f"{OP}: hidden size {hidden} is not a multiple of num_heads={heads}")
            x_BSHD = bb.emit(op.reshape(x, [dims[0], dims[1], heads, hidden // heads]))
            y = _rotate(bb, x_BSHD, cos, sin, position_ids, attr, head_axis=2)
            return op.reshape(y, dims)
        if len(dims) != 4:
            raise GraphError(f"{OP}: input must be 3-D or 4-D, got rank {len(dims)}")
        return _rotate(bb, x, cos, sin, position_ids, attr, head_axis=1)


def _rotate(bb, x, cos, sin, position_ids, attr: dict, head_axis: int) -> relax.Expr:
    """x is [B, H, S, D] (head_axis 1) or [B, S, H, D] (head_axis 2)."""
    head_dim = static_dim(shape_of(x, OP)[3], OP, "the head size")
    rotary_dim = attr.get("rotary_embedding_dim", 0) or head_dim
    if rotary_dim % 2 or rotary_dim > head_dim:
        raise GraphError(f"{OP}: rotary_embedding_dim={rotary_dim} must be even and at most the head size {head_dim}")
    half = rotary_dim // 2
    cos_BSR, sin_BSR = (_per_token_once(bb, c, position_ids, attr.get(CONTEXT_KEY)) for c in (cos, sin))
    if static_dim(shape_of(cos_BSR, OP)[-1], OP, "the cache width") != half:
        raise GraphError(f"{OP}: cos/sin caches have {shape_of(cos_BSR, OP)[-1]} columns, "
                         f"rotary_embedding_dim/2 = {half} expected")
    cos4, sin4 = (op.expand_dims(c, [head_axis]) for c in (cos_BSR, sin_BSR))
    x_rot = _slice_last(x, 0, rotary_dim, axis=3)
    if attr.get("interleaved", 0):
        pairs = op.reshape(x_rot, [*shape_of(x, OP)[:3], half, 2])
        x1, x2 = (op.squeeze(_slice_last(pairs, i, i + 1, axis=4), [4]) for i in (0, 1))
    else:
        x1, x2 = _slice_last(x_rot, 0, half, axis=3), _slice_last(x_rot, half, rotary_dim, axis=3)
    real = op.subtract(op.multiply(cos4, x1), op.multiply(sin4, x2))
    imag = op.add(op.multiply(sin4, x1), op.multiply(cos4, x2))
    if attr.get("interleaved", 0):
        rotated = op.reshape(op.stack([real, imag], axis=4), [*shape_of(x, OP)[:3], rotary_dim])
    else:
        rotated = op.concat([real, imag], axis=3)
    if rotary_dim == head_dim:
        return rotated
    return op.concat([rotated, _slice_last(x, rotary_dim, head_dim, axis=3)], axis=3)


def _per_token_once(bb, cache: relax.Expr, position_ids: relax.Expr | None, context) -> relax.Expr:
    """_per_token, emitted once per import: every layer gathers the same rows (one shared cache,
    one position_ids), which would otherwise be 4 small kernels per layer in each decode step."""
    if position_ids is None or context is None:
        return bb.normalize(_per_token(cache, position_ids))
    gathered = context.shared.setdefault(OP, {})
    key = (cache, position_ids)
    if key not in gathered:
        gathered[key] = bb.emit(_per_token(cache, position_ids))
    return gathered[key]


def _per_token(cache: relax.Expr, position_ids: relax.Expr | None) -> relax.Expr:
    """[B, S, R/2]: rows of a [P, R/2] cache picked by position_ids, or the cache itself."""
    # "clip": a position past the table must not read out of bounds (TVM's "fast" mode would)
    return cache if position_ids is None else op.take(cache, position_ids, axis=0, mode="clip")


def _slice_last(x: relax.Expr, begin: int, end: int, axis: int) -> relax.Expr:
    return op.strided_slice(x, axes=[axis], begin=[begin], end=[end], assume_inbound=True)
