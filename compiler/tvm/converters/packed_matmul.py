"""ai.kvc ``PackedMatMul`` and ``PackedGather`` -> Relax: one TE kernel reading the packed (and quantized) weight directly.

PackedMatMul(X [..., K], codes, scale?, zero_point?) with attributes K, N, tile T, bits, block_size B,
code_offset (layout: kvc.passes.lower_tvm_weight_codes) computes
  Y[..., n] = sum_k X[..., k] * W[k, n],   W[k, n] = (code(k, n) - zp(k, n)) * scale[n // T, k // B, n % T]
with the dequantization inside the reduction, so the weight bytes a step reads are the stored ones.
PackedGather(codes, ids, scale?, zero_point?) (same attributes) is Y[..., k] = W[k, ids[...]]: the rows of
a packed embedding table E = W^T, decoded only where looked up.
The matmul block is annotated (ANNOTATION = T) for kvc.compiler.tvm.schedules.cpu_packed_matmul; FuseOps
sees an output-elementwise-fusable kernel, so decode still fuses activations and residual adds into it.
"""
from __future__ import annotations

from dataclasses import dataclass

from tvm import relax, te, tirx
from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

from kvc.compiler.tvm.converters.common import dtype_of, shape_of
from kvc.contract import PACKED_GATHER_OP, PACKED_MATMUL_OP as OP
from kvc.errors import GraphError

ANNOTATION = "kvc.packed_matmul"  # block annotation: the packed tile T (columns per block)
HALF_ANNOTATION = "kvc.packed_matmul_half"  # 4-bit codes: columns per nibble half (T / 2), else 0


class PackedMatMul(OnnxOpConverter):
    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        x, codes = inputs[0], inputs[1]
        scale, zero_point = (inputs[i] if len(inputs) > i else None for i in (2, 3))
        k, n, tile, bits = (int(attr[a]) for a in ("K", "N", "tile", "bits"))
        block, offset = int(attr.get("block_size", 0)), int(attr.get("code_offset", 0))
        x_dims = shape_of(x, OP)
        if x_dims[-1] != k or dtype_of(x) != "float32" or (block > 0) != (scale is not None):
            raise GraphError(f"{OP}: X must be float32 [..., {k}] and scales given exactly when block_size > 0")
        args = [x, codes] + [v for v in (scale, zero_point) if v is not None]

        def compute(x_t, codes_t, *rest):
            scale_t = rest[0] if rest else None
            zp_t = rest[1] if len(rest) > 1 else None
            return _packed_matmul_te(x_t, codes_t, scale_t, zp_t, k, n, tile, bits, block, offset)

        return bb.emit_te(compute, *args, primfunc_name_hint="kvc_packed_matmul")


class PackedGather(OnnxOpConverter):
    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        codes, ids = inputs[0], inputs[1]
        scale, zero_point = (inputs[i] if len(inputs) > i else None for i in (2, 3))
        weight = _PackedWeight(*(int(attr.get(a, 0)) for a in ("K", "N", "tile", "bits", "block_size", "code_offset")))
        if not dtype_of(ids).startswith("int") or (weight.block > 0) != (scale is not None):
            raise GraphError(f"{PACKED_GATHER_OP}: ids must be integers and scales given exactly when block_size > 0")
        args = [codes, ids] + [v for v in (scale, zero_point) if v is not None]

        def compute(codes_t, ids_t, *rest):
            decode = weight.decoder(codes_t, rest[0] if rest else None, rest[1] if len(rest) > 1 else None)
            return te.compute(list(ids_t.shape) + [_i64(weight.k)],
                              lambda *idx: decode(ids_t[idx[:-1]].astype("int64"), idx[-1]), name="packed_gather")

        return bb.emit_te(compute, *args, primfunc_name_hint="kvc_packed_gather")


@dataclass(frozen=True)
class _PackedWeight:
    """The PackedMatMul / PackedGather attributes, and W(k, n) read from the packed buffers."""

    k: int
    n: int
    tile: int
    bits: int
    block: int
    offset: int

    def decoder(self, codes, scale, zero_point):
        tile, block, offset = self.tile, self.block, self.offset
        half = tile // 2 if self.bits == 4 else 0

        def weight(col, red):
            blk, j = col // tile, col % tile
            if half:
                byte = codes[blk, red, j % half].astype("int32")
                code = tirx.bitwise_and(tirx.shift_right(byte, (j // half * 4).astype("int32")), 15)
            else:
                code = codes[blk, red, j]
            value = code.astype("float32")
            if not block:
                return value
            if zero_point is not None:
                value = value - zero_point[blk, red // block, j].astype("float32")
            elif offset:
                value = value - float(offset)
            return value * scale[blk, red // block, j]

        return weight


def _i64(v: int):
    return tirx.IntImm("int64", v)


def _packed_matmul_te(x, codes, scale, zero_point, k: int, n: int, tile: int, bits: int, block: int, offset: int):
    weight = _PackedWeight(k, n, tile, bits, block, offset).decoder(codes, scale, zero_point)
    half = tile // 2 if bits == 4 else 0
    red = te.reduce_axis((_i64(0), _i64(k)), "k")
    out_shape = list(x.shape[:-1]) + [_i64(n)]
    return te.compute(out_shape, lambda *idx: te.sum(x[(*idx[:-1], red)] * weight(idx[-1], red), axis=red),
                      name="packed_matmul", attrs={ANNOTATION: tile, HALF_ANNOTATION: half})
