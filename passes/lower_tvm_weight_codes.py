"""TVM lowering: weight matmuls -> ai.kvc PackedMatMul on weights re-laid out once, here, for the GEMV
schedule; 4-bit codes two per byte, dequantized inside the matmul. Left-over 4-bit codes (the embedding
table, a tied lm_head) are stored one per byte.

Why: ONNX stores a projection W [K, N] row-major. A decode GEMV parallel over column blocks then reads
K short strided segments per block; packed as [N/T, K, T] each parallel block streams one contiguous
slab (benchmarks/tvm_gemv_layouts.py: 2-2.5x faster on llama-100m's lm_head, near numpy/OpenBLAS).
Quantized weights would otherwise be decoded to a float32 W by a separate kernel every step (the
bytes read per step were the fp32 bytes, plus the codes); here the kernel reads the codes themselves.

Patterns (W, q, s, zp constant initializers read by nothing else):
  MatMul(X, W [K, N] float32)
  MatMul(X, Cast(W [K, N] float16 / bfloat16, to=float32))   (--weights fp16 / bf16: packed in that dtype)
  MatMul(X, DequantizeLinear(q [K, N] int8/uint8/int4/uint4, s [ceil(K/B), N], zp?, axis=0, block_size=B))
  -> PackedMatMul(X, codes, scale?, zero_point?)   domain ai.kvc
     attributes K, N, tile T, bits (32 | 16 | 8 | 4), block_size B (0: unquantized), code_offset
     codes       [N/T, K, T] float32 / float16 / int8 / uint8; bits 4: [N/T, K, T/2] uint8, byte j of a
                 row holding column j in its low nibble and column j + T/2 in its high one (both halves
                 of a vector load are contiguous columns)
     scale       [N/T, ceil(K/B), T] float32; zero_point [N/T, ceil(K/B), T] uint8 (asymmetric only)
  meaning  Y = X @ W,  W[k, n] = (code[k, n] - zp) * scale[k // B, n], zp = zero_point[k // B, n] or
           code_offset when there is none (8 for int4: signed codes are stored + 8, unsigned nibbles).
A quantized embedding table E [V, H] (blocks along H), or an fp16/bf16 one, is W = E^T [K = H, N = V] in this
form, stored once:
  MatMul(X, Transpose(DequantizeLinear(q [V, H], s, zp?, axis=1, block_size=B), perm=[1, 0]))  (tied lm_head;
                                                                         or Transpose(Cast(E [V, H] half)))
  -> PackedMatMul(X, codes, scale?, zero_point?)
  Gather(DequantizeLinear(q [V, H], ...) or Cast(E half), ids)  -> PackedGather(codes, ids, scale?, zero_point?)
     same attributes; Y[..., h] = W[h, ids[...]] (non-negative ids): only the looked-up rows are decoded
The TVM converter is kvc.compiler.tvm.converters.packed_matmul, the schedule
kvc.compiler.tvm.schedules.cpu_packed_matmul.

Why 4-bit codes one per byte elsewhere: TVM's ONNX importer cannot load 4-bit initializers (it copies
one byte per element into a tensor TVM packs two per byte); the DequantizeLinear reading them is
unchanged, so the decoded values are bit-identical.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from kvc.contract import KVC_DOMAIN, KVC_DOMAIN_VERSION, PACKED_GATHER_OP, PACKED_MATMUL_OP
from kvc.passes.base import KvcPass, PassReport

_WIDER = {ir.DataType.INT4: np.int8, ir.DataType.UINT4: np.uint8}
_HALF = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)  # --weights fp16/bf16: Cast(W) -> MatMul
_BITS = {ir.DataType.INT4: 4, ir.DataType.UINT4: 4, ir.DataType.INT8: 8, ir.DataType.UINT8: 8}
TILES = (64, 32, 16)  # columns per packed block, widest first
MIN_BLOCKS = 16  # a tile narrower than the widest keeps >= this many parallel blocks (2-16 cores busy)
INT4_OFFSET = 8  # signed int4 codes are stored + 8 (unsigned nibbles)


@dataclass(frozen=True)
class PackedWeight:
    """The PackedMatMul inputs (after X) and attributes for one weight."""

    codes: np.ndarray
    scale: np.ndarray | None
    zero_point: np.ndarray | None
    attributes: dict


def choose_tile(n: int, bits: int) -> int | None:
    """Columns per packed block: the widest in TILES dividing ``n`` that still leaves MIN_BLOCKS blocks,
    else the narrowest dividing ``n``; None if none does (the matmul stays unpacked). 4-bit tiles hold
    two halves of >= 8 columns (one AVX2 vector each)."""
    fits = [t for t in TILES if n % t == 0 and (bits != 4 or t >= 16)]
    if not fits:
        return None
    return next((t for t in fits if n // t >= MIN_BLOCKS), fits[-1])


def pack_columns(a: np.ndarray, tile: int) -> np.ndarray:
    """[R, N] -> [N / tile, R, tile]: each block of ``tile`` columns one contiguous slab."""
    rows, n = a.shape
    return np.ascontiguousarray(a.reshape(rows, n // tile, tile).transpose(1, 0, 2))


def pack_nibble_halves(codes: np.ndarray) -> np.ndarray:
    """[B, R, T] values 0..15 -> [B, R, T/2] uint8: column j low nibble, column j + T/2 high nibble."""
    half = codes.shape[-1] // 2
    return (codes[..., :half] | (codes[..., half:] << 4)).astype(np.uint8)


def unpack(packed: PackedWeight) -> np.ndarray:
    """The float32 W [K, N] a PackedMatMul multiplies by (the reference the tests check the kernel against)."""
    attrs, codes = packed.attributes, packed.codes
    if attrs["bits"] == 4:
        codes = np.concatenate([codes & 15, codes >> 4], -1)
    values = codes.astype(np.float32)
    if attrs["block_size"]:
        block, k = attrs["block_size"], attrs["K"]
        expand = lambda a: np.repeat(a.astype(np.float32), block, axis=1)[:, :k]  # noqa: E731
        zero = expand(packed.zero_point) if packed.zero_point is not None else np.float32(attrs["code_offset"])
        values = (values - zero) * expand(packed.scale)
    blocks, k, tile = values.shape
    return values.transpose(1, 0, 2).reshape(k, blocks * tile)


def pack_float(w: np.ndarray) -> PackedWeight | None:
    k, n = w.shape
    tile = choose_tile(n, 32)
    if tile is None:
        return None
    bits = 8 * w.dtype.itemsize  # float32, float16 or bfloat16 (ml_dtypes)
    return PackedWeight(pack_columns(w, tile), None, None,
                        {"K": k, "N": n, "tile": tile, "bits": bits, "block_size": 0, "code_offset": 0})


def pack_quantized(codes: np.ndarray, bits: int, signed: bool, scale: np.ndarray, zero_point: np.ndarray | None,
                   block: int) -> PackedWeight | None:
    """codes [K, N] (int8/uint8, or int4/uint4 values in a wider type), scale/zero_point [ceil(K/B), N]."""
    k, n = codes.shape
    tile = choose_tile(n, bits)
    if tile is None:
        return None
    offset = INT4_OFFSET if bits == 4 and signed else 0
    if bits == 4:
        stored = pack_nibble_halves(pack_columns(codes.astype(np.int32) + offset, tile))
        zero_point = None if zero_point is None else zero_point.astype(np.int32) + offset
    else:
        stored = pack_columns(codes.astype(np.int8 if signed else np.uint8), tile)
    zp = None if zero_point is None else pack_columns(np.asarray(zero_point).astype(np.uint8), tile)
    return PackedWeight(stored, pack_columns(scale.astype(np.float32), tile), zp,
                        {"K": k, "N": n, "tile": tile, "bits": bits, "block_size": block, "code_offset": offset})


class LowerTvmWeightCodesPass(KvcPass):
    name = "lower_tvm_weight_codes"

    def apply(self, model: ir.Model) -> PassReport:
        report = PassReport(self.name)
        graph = model.graph
        skipped: list[str] = []
        for source in [n for n in graph if n.op_type == "DequantizeLinear" and n.domain == ""]:
            report.matched += _pack_table(graph, source)
        for table in [v for v in graph.initializers.values() if v.dtype in _HALF]:
            report.matched += _pack_half_table(graph, table)
        for node in list(graph):
            if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
                continue
            packed = _packed_weight(graph, node, skipped)
            if packed is not None:
                _replace(graph, node, packed)
                report.matched += 1
        if report.matched:
            model.opset_imports.setdefault(KVC_DOMAIN, KVC_DOMAIN_VERSION)
            graph.opset_imports.setdefault(KVC_DOMAIN, KVC_DOMAIN_VERSION)
            # the dequantize / cast nodes and the unpacked weights; no re-sort: each new node took its old
            # node's place, and a sorted order moves other nodes (TVM's decode fusion is sensitive to it)
            RemoveUnusedNodesPass()(model)
            report.notes.append(f"{report.matched} weight matmuls / embedding gathers read weights packed [N/T, K, T]")
        if skipped:
            report.notes.append(f"{len(skipped)} weight matmuls left unpacked, e.g. {skipped[0]}")
        widened = _widen_4bit_leftovers(graph, report)
        if widened:
            report.notes.append(f"{widened} 4-bit initializers (embedding / tied lm_head) stored one code per byte")
        return report


def _constant(graph: ir.Graph, value: ir.Value | None) -> bool:
    return value is not None and value.name in graph.initializers and value.const_value is not None


def _only_use(value: ir.Value, node: ir.Node) -> bool:
    return len(value.uses()) == 1 and value.uses()[0].node is node and not value.is_graph_output()


def _packed_weight(graph: ir.Graph, matmul: ir.Node, skipped: list[str]) -> PackedWeight | None:
    """The re-laid-out weight of ``matmul`` when its B input is a form the kernel reads, else None."""
    weight = matmul.inputs[1]
    x = matmul.inputs[0]
    if weight is None or x is None or x.shape is None or len(x.shape) < 2 or not _only_use(weight, matmul):
        return None
    producer = weight.producer()
    if producer is None:
        if not _constant(graph, weight) or weight.dtype != ir.DataType.FLOAT or len(weight.shape) != 2:
            return None
        packed = pack_float(weight.const_value.numpy())
    elif producer.op_type == "Cast" and producer.domain == "":
        stored = producer.inputs[0]
        if (not _constant(graph, stored) or stored.dtype not in _HALF or len(stored.shape) != 2
                or not _only_use(stored, producer) or producer.attributes.get_int("to", 0) != ir.DataType.FLOAT):
            return None
        packed = pack_float(stored.const_value.numpy())
    elif producer.op_type == "DequantizeLinear" and producer.domain == "":
        packed = _packed_dequantize(graph, producer)
    else:
        return None
    if packed is None:
        skipped.append(f"{matmul.name} (N {weight.shape[-1]} has no tile)")
    return packed


def _packed_dequantize(graph: ir.Graph, dq: ir.Node) -> PackedWeight | None:
    codes, scale = dq.inputs[0], dq.inputs[1]
    zero_point = dq.inputs[2] if len(dq.inputs) > 2 else None
    if not _constant(graph, codes) or codes.dtype not in _BITS or len(codes.shape) != 2 or not _only_use(codes, dq):
        return None
    if not _constant(graph, scale) or scale.dtype != ir.DataType.FLOAT or (zero_point is not None
                                                                            and not _constant(graph, zero_point)):
        return None
    block = dq.attributes.get_int("block_size", 0)
    if block <= 0 or dq.attributes.get_int("axis", 1) % 2 != 0:
        return None
    signed = codes.dtype in (ir.DataType.INT4, ir.DataType.INT8)
    zp = None if zero_point is None else zero_point.const_value.numpy().astype(np.int32)
    if signed and zp is not None and np.any(zp):
        return None  # a signed zero point: not a scheme kvc writes
    return pack_quantized(codes.const_value.numpy().astype(np.int32), _BITS[codes.dtype], signed,
                          scale.const_value.numpy(), None if signed else zp, block)


def _pack_table(graph: ir.Graph, source: ir.Node) -> int:
    """A table read only by Gathers and transposed by tied lm_heads through the DequantizeLinear ``source``
    (blocked along H): packed once as W = E^T; the number of nodes rewritten (0 when the table is not in that
    form)."""
    if source.outputs[0].is_graph_output():
        return 0
    gathers, matmuls = [], []
    for use in source.outputs[0].uses():
        node = use.node
        if node.op_type == "Gather" and node.domain == "" and use.idx == 0 and node.attributes.get_int("axis", 0) == 0:
            gathers.append(node)
        elif _tied_transpose(node):
            matmuls += [u.node for u in node.outputs[0].uses()]
        else:
            return 0
    packed = _table_packing(graph, source)  # after the uses: packing a large table costs a copy
    if packed is None:
        return 0
    weights = _packed_initializers(graph, packed, source.inputs[0].name)
    for matmul in matmuls:
        _replace_node(graph, matmul, PACKED_MATMUL_OP, [matmul.inputs[0], *weights], packed.attributes)
    for gather in gathers:
        _replace_node(graph, gather, PACKED_GATHER_OP, [weights[0], gather.inputs[1], *weights[1:]], packed.attributes)
    return len(matmuls) + len(gathers)


def _table_packing(graph: ir.Graph, source: ir.Node) -> PackedWeight | None:
    """W = E^T packed, for a table E [V, H] that the DequantizeLinear ``source`` decodes (all of E's reads go
    through it)."""
    table = source.inputs[0] if source.inputs else None
    if source.domain != "" or not _constant(graph, table) or len(table.shape) != 2 or len(table.uses()) != 1:
        return None
    scale = source.inputs[1]
    zero_point = source.inputs[2] if len(source.inputs) > 2 else None
    if (table.dtype not in _BITS or source.attributes.get_int("block_size", 0) <= 0
            or source.attributes.get_int("axis", 1) % 2 != 1
            or not _constant(graph, scale) or scale.dtype != ir.DataType.FLOAT
            or (zero_point is not None and not _constant(graph, zero_point))):
        return None
    signed = table.dtype in (ir.DataType.INT4, ir.DataType.INT8)
    zp = None if zero_point is None else zero_point.const_value.numpy().astype(np.int32)
    if signed and zp is not None and np.any(zp):
        return None
    return pack_quantized(table.const_value.numpy().astype(np.int32).T, _BITS[table.dtype], signed,
                          scale.const_value.numpy().T, None if signed or zp is None else zp.T,
                          source.attributes.get_int("block_size"))


def _pack_half_table(graph: ir.Graph, table: ir.Value) -> int:
    """An fp16/bf16 table E [V, H] as --weights fp16/bf16 stores it: rows read by Cast(Gather(E, ids)), a tied
    lm_head by MatMul(X, Transpose(Cast(E))). Packed once as W = E^T, read by PackedGather / PackedMatMul, so
    no step widens or transposes the whole table; the number of nodes rewritten (0: not that form)."""
    if not _constant(graph, table) or len(table.shape) != 2 or table.is_graph_output():
        return 0
    row_casts, matmuls = [], []
    for use in table.uses():
        node, out = use.node, use.node.outputs[0]
        users = [u.node for u in out.uses()]
        if out.is_graph_output() or node.domain != "" or use.idx != 0:
            return 0
        if node.op_type == "Gather" and node.attributes.get_int("axis", 0) == 0 and len(users) == 1 \
                and _casts_to_float(users[0]):
            row_casts.append((node, users[0]))
        elif _casts_to_float(node) and users and all(_tied_transpose(u) for u in users):
            matmuls += [m.node for u in users for m in u.outputs[0].uses()]
        else:
            return 0
    packed = pack_float(table.const_value.numpy().T)
    if packed is None:
        return 0
    (codes,) = _packed_initializers(graph, packed, table.name)
    for matmul in matmuls:
        _replace_node(graph, matmul, PACKED_MATMUL_OP, [matmul.inputs[0], codes], packed.attributes)
    for gather, cast in row_casts:
        _replace_node(graph, cast, PACKED_GATHER_OP, [codes, gather.inputs[1]], packed.attributes)
    return len(matmuls) + len(row_casts)


def _casts_to_float(node: ir.Node) -> bool:
    return node.op_type == "Cast" and node.domain == "" and node.attributes.get_int("to", 0) == ir.DataType.FLOAT


def _tied_transpose(node: ir.Node) -> bool:
    """Transpose(perm [1, 0]) read only as the B input of MatMuls."""
    out = node.outputs[0]
    return (node.op_type == "Transpose" and node.domain == "" and list(node.attributes.get_ints("perm", [])) == [1, 0]
            and not out.is_graph_output() and bool(out.uses())
            and all(u.node.op_type == "MatMul" and u.node.domain == "" and u.idx == 1 for u in out.uses()))


def _packed_initializers(graph: ir.Graph, packed: PackedWeight, base: str) -> list[ir.Value]:
    values = [_initializer(graph, packed.codes, f"{base}.packed")]
    if packed.scale is not None:
        values.append(_initializer(graph, packed.scale, f"{base}.packed_scales"))
    if packed.zero_point is not None:
        values.append(_initializer(graph, packed.zero_point, f"{base}.packed_zero_points"))
    return values


def _replace(graph: ir.Graph, matmul: ir.Node, packed: PackedWeight) -> None:
    weights = _packed_initializers(graph, packed, matmul.inputs[1].name)
    _replace_node(graph, matmul, PACKED_MATMUL_OP, [matmul.inputs[0], *weights], packed.attributes)


def _replace_node(graph: ir.Graph, old_node: ir.Node, op_type: str, inputs: list, attributes: dict) -> None:
    new = ir.node(op_type, inputs, attributes=attributes, domain=KVC_DOMAIN)
    graph.insert_before(old_node, new)
    old, out = old_node.outputs[0], new.outputs[0]
    out.dtype = ir.DataType.FLOAT
    out.shape = old.shape
    old.replace_all_uses_with(out, replace_graph_outputs=True)
    name = old.name
    graph.remove(old_node, safe=True)
    out.name = name


def _initializer(graph: ir.Graph, array: np.ndarray, name: str) -> ir.Value:
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _widen_4bit_leftovers(graph: ir.Graph, report: PassReport) -> int:
    widened = 0
    for name, value in list(graph.initializers.items()):
        tensor = value.const_value
        if tensor is None or tensor.dtype not in _WIDER:
            continue
        if not all(u.node.op_type == "DequantizeLinear" and u.idx in (0, 2) for u in value.uses()):
            report.notes.append(f"{name}: 4-bit initializer read by something other than DequantizeLinear; "
                                "left as is")
            continue
        wide = tensor.numpy().astype(np.int32).astype(_WIDER[tensor.dtype])
        value.const_value = ir.tensor(wide, name=name)
        value.dtype = ir.DataType.from_numpy(wide.dtype)
        widened += 1
    return widened
