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
STAGE_ANNOTATION = "kvc.packed_matmul_stage"  # the per-block sums a quantized matmul computes first


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

    def code_reader(self, codes):
        """code(n, k): the stored code of W[k, n] (a nibble for 4 bits)."""
        tile, half = self.tile, (self.tile // 2 if self.bits == 4 else 0)

        def code(col, red):
            blk, j = col // tile, col % tile
            if half:
                byte = codes[blk, red, j % half].astype("int32")
                return tirx.bitwise_and(tirx.shift_right(byte, (j // half * 4).astype("int32")), 15)
            return codes[blk, red, j]

        return code

    def decoder(self, codes, scale, zero_point):
        tile, block, offset = self.tile, self.block, self.offset
        code = self.code_reader(codes)

        def weight(col, red):
            blk, j = col // tile, col % tile
            value = code(col, red).astype("float32")
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
    """Y = X @ W. Quantized weights are summed per scale block first (codes only), then scaled once per block:
      partial[.., b, n] = sum_{k in block b} x[.., k] * code(k, n)        xsum[.., b] = sum_{k in b} x[.., k]
      Y[.., n]         = sum_b (partial[.., b, n] - zp(b, n) * xsum[.., b]) * scale(b, n)
    which is the same sum, with a convert and an FMA per weight instead of also a subtract and a multiply."""
    packed = _PackedWeight(k, n, tile, bits, block, offset)
    attrs = {ANNOTATION: tile, HALF_ANNOTATION: tile // 2 if bits == 4 else 0}
    rows = list(x.shape[:-1])
    blocks = -(-k // block) if block else 0
    if blocks <= 1:  # unquantized, or one scale block spans K (a unit loop over blocks would not stay a loop)
        weight = packed.decoder(codes, scale, zero_point)
        red = te.reduce_axis((_i64(0), _i64(k)), "k")
        return te.compute(rows + [_i64(n)], lambda *idx: te.sum(x[(*idx[:-1], red)] * weight(idx[-1], red), axis=red),
                          name="packed_matmul", attrs=attrs)
    code = packed.code_reader(codes)
    inner = te.reduce_axis((_i64(0), _i64(block)), "ki")

    def in_block(b, i, value):
        """value(row k) for k = b * block + i; zero past K (a partial last block: the index is clamped so that
        nothing is read out of bounds; te.sum's ``where`` is dropped by create_prim_func)."""
        index = b * block + i
        if k % block == 0:
            return value(index)
        return tirx.if_then_else(index < k, value(tirx.min(index, _i64(k - 1))), tirx.const(0.0, "float32"))

    partial = te.compute(rows + [_i64(blocks), _i64(n)], lambda *idx: te.sum(in_block(
        idx[-2], inner, lambda kk: x[(*idx[:-2], kk)] * code(idx[-1], kk).astype("float32")), axis=inner),
        name="packed_partial", attrs={STAGE_ANNOTATION: 1})
    has_zero = zero_point is not None or offset
    if has_zero:
        x_inner = te.reduce_axis((_i64(0), _i64(block)), "xi")
        x_sum = te.compute(rows + [_i64(blocks)], lambda *idx: te.sum(in_block(
            idx[-1], x_inner, lambda kk: x[(*idx[:-1], kk)]), axis=x_inner), name="packed_xsum",
            attrs={STAGE_ANNOTATION: 1})
    red = te.reduce_axis((_i64(0), _i64(blocks)), "kb")

    def scaled(*idx):
        col, blk, j = idx[-1], idx[-1] // tile, idx[-1] % tile
        value = partial[(*idx[:-1], red, col)]
        if has_zero:
            zero = zero_point[blk, red, j].astype("float32") if zero_point is not None else float(offset)
            value = value - zero * x_sum[(*idx[:-1], red)]
        return te.sum(value * scale[blk, red, j], axis=red)

    return te.compute(rows + [_i64(n)], scaled, name="packed_matmul", attrs=attrs)
