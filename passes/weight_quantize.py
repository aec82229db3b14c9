"""Weight precision (neutral pass): store the weight matrices and the embedding table in fp16 / bf16, or
quantize them weight-only to int8 / int4 with one scale (and, asymmetric, one zero point) per block of
``block_size`` values along the input (K) dim, in standard ONNX:

  fp16/bf16   W_h [K, N]                        -> Cast(to float) -> MatMul
  int8/int4   W_q [K, N], scale [K/B, N] (, zp)  -> DequantizeLinear(axis=0, block_size=B) -> MatMul
  embedding   E [V, H]: blocks along H (the dim the tied lm_head reduces over)
              DequantizeLinear(E_q, axis=1) -> Gather   (ONNX's Gather takes no 4-bit types; the
              lowering turns the pair into ORT's GatherBlockQuantized, which decodes only the rows)
  tied        lm_head W == E^T (bit for bit): E is stored once; lm_head = MatMul(X, Transpose(deq(E)))

Engines lower the dequantize + matmul pair to their own kernels (ORT: MatMulNBits / GatherBlockQuantized;
TVM: ai.kvc PackedMatMul / PackedGather on column-blocked codes, int4 two per byte, dequantized inside the
kernel; passes/lower_tvm_weight_codes.py). The codec
(``quantize_blocks`` / ``dequantize_blocks``) is the reference; ``decode_weights_in_place`` makes the
same-scheme fp32 graph that `kvc compile` checks a quantized artifact against.
"""
from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir

from kvc.contract import WEIGHT_BLOCK_SIZES, WeightDtype
from kvc.errors import KvcError
from kvc.passes.base import KvcPass, PassReport

BLOCKED_DQ_OPSET = 21  # DequantizeLinear's block_size and the 4-bit types


@dataclass(frozen=True)
class WeightQuantOptions:
    dtype: WeightDtype = WeightDtype.FP32
    block_size: int = 32  # values per scale along the input dim (int8 / int4)
    symmetric: bool = True  # False: unsigned codes with a zero point per block

    def __post_init__(self) -> None:
        if not isinstance(self.dtype, WeightDtype):
            object.__setattr__(self, "dtype", WeightDtype(self.dtype))
        if self.block_size not in WEIGHT_BLOCK_SIZES:
            raise KvcError(f"--weight-block {self.block_size} is not supported; choose one of "
                           f"{list(WEIGHT_BLOCK_SIZES)}")


@dataclass(frozen=True)
class QuantizedBlocks:
    codes: np.ndarray  # int8/uint8 or ml_dtypes int4/uint4, the input's shape
    scale: np.ndarray  # float32, the input's shape with ``axis`` divided by the block (rounded up)
    zero_point: np.ndarray | None  # codes' dtype, scale's shape (asymmetric only)


# --- codec (the reference) --------------------------------------------------------------------
def code_dtype(bits: int, symmetric: bool) -> np.dtype:
    table = {(8, True): np.int8, (8, False): np.uint8, (4, True): ml_dtypes.int4, (4, False): ml_dtypes.uint4}
    return np.dtype(table[(bits, symmetric)])


def quantize_blocks(w: np.ndarray, bits: int, block: int, symmetric: bool, axis: int) -> QuantizedBlocks:
    """Per-block scales along ``axis``: symmetric codes in [-(2^(b-1)-1), 2^(b-1)-1], scale = max|w| / that;
    asymmetric codes in [0, 2^b - 1] over [min(w, 0), max(w, 0)] (zero is exact), zero point rounded."""
    moved = np.moveaxis(np.asarray(w, np.float32), axis, -1)
    length = moved.shape[-1]
    blocks = -(-length // block)
    padded = np.zeros(moved.shape[:-1] + (blocks * block,), np.float32)
    padded[..., :length] = moved
    grouped = padded.reshape(moved.shape[:-1] + (blocks, block))
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = np.abs(grouped).max(-1) / qmax
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        codes = np.clip(np.rint(grouped / scale[..., None]), -qmax, qmax)
        zero_point = None
    else:
        qmax = 2 ** bits - 1
        low, high = np.minimum(grouped.min(-1), 0.0), np.maximum(grouped.max(-1), 0.0)
        scale = ((high - low) / qmax)
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        zero_point = np.clip(np.rint(-low / scale), 0, qmax)
        codes = np.clip(np.rint(grouped / scale[..., None]) + zero_point[..., None], 0, qmax)
    dtype = code_dtype(bits, symmetric)
    codes = codes.reshape(padded.shape)[..., :length].astype(np.int32).astype(dtype)
    back = lambda a: np.moveaxis(a, -1, axis)  # noqa: E731
    return QuantizedBlocks(back(codes), back(scale),
                           None if zero_point is None else back(zero_point.astype(np.int32).astype(dtype)))


def dequantize_blocks(q: QuantizedBlocks, block: int, axis: int) -> np.ndarray:
    """(code - zero_point) * scale, the scale of each block repeated over its values."""
    length = q.codes.shape[axis]
    expand = lambda a: np.repeat(a.astype(np.float32), block, axis=axis).take(range(length), axis=axis)  # noqa: E731
    values = q.codes.astype(np.float32)
    if q.zero_point is not None:
        values = values - expand(q.zero_point)
    return (values * expand(q.scale)).astype(np.float32)


def decoded(weights: np.ndarray, options: WeightQuantOptions, axis: int) -> np.ndarray:
    """``weights`` stored in the scheme and read back, as float32 (blocks along ``axis``)."""
    if options.dtype is WeightDtype.FP32:
        return weights
    if options.dtype is WeightDtype.FP16:
        return weights.astype(np.float16).astype(np.float32)
    if options.dtype is WeightDtype.BF16:
        return weights.astype(ml_dtypes.bfloat16).astype(np.float32)
    q = quantize_blocks(weights, options.dtype.bits, options.block_size, options.symmetric, axis)
    return dequantize_blocks(q, options.block_size, axis)


def decode_weights_in_place(model: ir.Model, options: WeightQuantOptions) -> None:
    """Replace every weight the pass stores (the same selection) by its decoded values: blocks along K for
    MatMul weights, along H for embedding tables, whose decoded rows a tied lm_head reads transposed. The
    fp32 graph that computes what the quantized one does, up to summation order."""
    graph = model.graph
    tied_names: set[str] = set()
    for table in _embedding_tables(graph):
        rows = decoded(table.const_value.numpy(), options, 1)
        for weight in [w for w in _matmul_weights(graph) if _is_transpose_of(w, table)]:
            weight.const_value = ir.tensor(rows.T.copy(), name=weight.name)
            tied_names.add(weight.name)
        table.const_value = ir.tensor(rows, name=table.name)
    for weight in _matmul_weights(graph):
        if weight.name not in tied_names:
            weight.const_value = ir.tensor(decoded(weight.const_value.numpy(), options, 0), name=weight.name)


# --- the pass ---------------------------------------------------------------------------------
class WeightQuantizePass(KvcPass):
    name = "weight_quantize"

    def __init__(self, options: WeightQuantOptions) -> None:
        super().__init__()
        self.options = options
        self.min_opset = BLOCKED_DQ_OPSET if options.dtype.quantized else 0

    def apply(self, model: ir.Model) -> PassReport:
        report = PassReport(self.name)
        if self.options.dtype is WeightDtype.FP32:
            return report
        graph = model.graph
        rewriter = _Rewriter(graph, self.options)
        tables = _embedding_tables(graph)
        for table in tables:
            tied = [w for w in _matmul_weights(graph) if _is_transpose_of(w, table)]
            rewriter.embedding(table, tied)
            report.matched += 1 + len(tied)
            if tied:
                report.notes.append(f"{table.name}: tied with {len(tied)} lm_head weight(s), stored once")
        for weight in _matmul_weights(graph):
            rewriter.matmul_weight(weight)
            report.matched += 1
        if report.matched:
            graph.sort()
            report.notes.append(f"weights {self.options.dtype.value}"
                                + (f", block {self.options.block_size}, "
                                   f"{'symmetric' if self.options.symmetric else 'asymmetric'}"
                                   if self.options.dtype.quantized else ""))
        return report


def _float_initializer(graph: ir.Graph, value: ir.Value | None) -> bool:
    return (value is not None and value.name in graph.initializers and value.const_value is not None
            and value.const_value.dtype == ir.DataType.FLOAT and value.shape is not None and len(value.shape) == 2)


def _matmul_weights(graph: ir.Graph) -> list[ir.Value]:
    """Constant float [K, N] initializers read only as a MatMul's second input."""
    found = {}
    for node in graph:
        if node.op_type == "MatMul" and node.domain == "" and _float_initializer(graph, node.inputs[1]):
            weight = node.inputs[1]
            if all(u.node.op_type == "MatMul" and u.idx == 1 for u in weight.uses()):
                found[weight.name] = weight
    return list(found.values())


def _embedding_tables(graph: ir.Graph) -> list[ir.Value]:
    """Constant float [V, H] initializers read only by Gathers along axis 0."""
    found = {}
    for node in graph:
        if node.op_type == "Gather" and node.domain == "" and _float_initializer(graph, node.inputs[0]):
            table = node.inputs[0]
            if all(u.node.op_type == "Gather" and u.idx == 0 and u.node.attributes.get_int("axis", 0) == 0
                   for u in table.uses()):
                found[table.name] = table
    return list(found.values())


def _is_transpose_of(weight: ir.Value, table: ir.Value) -> bool:
    if tuple(weight.shape) != tuple(table.shape)[::-1]:
        return False
    return np.array_equal(weight.const_value.numpy(), table.const_value.numpy().T)


class _Rewriter:
    """Builds the stored weights and the nodes that read them; every new value keeps the old consumers."""

    def __init__(self, graph: ir.Graph, options: WeightQuantOptions) -> None:
        self.graph, self.options = graph, options
        self.tape = ir.tape.Tape(graph)

    def _init(self, array: np.ndarray, name: str) -> ir.Value:
        return self.tape.initializer(ir.tensor(array, name=name))

    def _stored(self, value: ir.Value, axis: int) -> tuple[ir.Value, ...]:
        """The stored form of ``value``: (half,) or (codes, scale[, zero_point]), blocks along ``axis``."""
        o, name, w = self.options, value.name, value.const_value.numpy()
        if not o.dtype.quantized:
            half = w.astype(np.float16 if o.dtype is WeightDtype.FP16 else ml_dtypes.bfloat16)
            return (self._init(half, f"{name}.{o.dtype.value}"),)
        q = quantize_blocks(w, o.dtype.bits, o.block_size, o.symmetric, axis)
        stored = [self._init(q.codes, f"{name}.q{o.dtype.bits}"), self._init(q.scale, f"{name}.scale")]
        if q.zero_point is not None:
            stored.append(self._init(q.zero_point, f"{name}.zero_point"))
        return tuple(stored)

    def _decode(self, stored: tuple[ir.Value, ...], axis: int) -> ir.Value:
        if len(stored) == 1:
            return self.tape.op("Cast", [stored[0]], {"to": ir.DataType.FLOAT})
        return self.tape.op("DequantizeLinear", list(stored),
                            {"axis": axis, "block_size": self.options.block_size})

    def matmul_weight(self, weight: ir.Value) -> None:
        decoded = self._decode(self._stored(weight, axis=0), axis=0)
        self._replace(weight, decoded)

    def embedding(self, table: ir.Value, tied: list[ir.Value]) -> None:
        stored = self._stored(table, axis=1)
        full = None  # the whole table decoded (int4 Gathers and tied lm_heads read it)
        for use in list(table.uses()):
            gather = use.node
            ids = gather.inputs[1]
            if len(stored) == 1:
                rows = self.tape.op("Cast", [self.tape.op("Gather", [stored[0], ids], {"axis": 0})],
                                    {"to": ir.DataType.FLOAT})
            else:
                if full is None:
                    full = self._decode(stored, axis=1)
                rows = self.tape.op("Gather", [full, ids], {"axis": 0})
            self._replace_output(gather, rows)
        for weight in tied:
            if full is None:
                full = self._decode(stored, axis=1)
            self._replace(weight, self.tape.op("Transpose", [full], {"perm": [1, 0]}))
        self.graph.initializers.pop(table.name)

    def _replace(self, weight: ir.Value, new: ir.Value) -> None:
        new.dtype, new.shape = ir.DataType.FLOAT, weight.shape
        weight.replace_all_uses_with(new)
        self.graph.initializers.pop(weight.name)

    def _replace_output(self, node: ir.Node, new: ir.Value) -> None:
        old = node.outputs[0]
        new.dtype = ir.DataType.FLOAT  # every table's rows come back as float32
        if old.shape is not None:
            new.shape = old.shape
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        name = old.name
        self.graph.remove(node, safe=True)
        new.name = name
