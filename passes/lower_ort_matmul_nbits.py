"""ORT lowering: blocked weight-only DequantizeLinear + MatMul -> com.microsoft MatMulNBits, and the int4
embedding's DequantizeLinear + Gather -> com.microsoft GatherBlockQuantized.

Why: ONNX Runtime's CPU DequantizeLinear writes the whole fp32 weight every step (or constant folding
stores it as fp32 in memory), so the 4/8-bit weights would save nothing. MatMulNBits reads the packed
codes and dequantizes inside its GEMV/GEMM (MLAS); GatherBlockQuantized dequantizes only the gathered rows.

Patterns (q: constant int4/uint4/int8/uint8 codes, s: float scales, zp: optional zero points):
  MatMul(X, DequantizeLinear(q [K, N], s [K/B, N], zp, axis=0, block_size=B))
  MatMul(X, Transpose(DequantizeLinear(q [N, K], s [N, K/B], zp, axis=1, block_size=B), perm=[1, 0]))
      (the tied lm_head: the embedding's codes are already MatMulNBits's [N, K] layout)
  -> MatMulNBits(X, packed [N, K/B, B*bits/8] uint8, s [N, K/B], zp packed; K, N, bits, block_size)
  Gather(DequantizeLinear(q [V, H], s [V, H/B], zp, axis=1, block_size=B), ids)
  -> Reshape(GatherBlockQuantized(packed [V, H/B, B*bits/8], ids, s [V, H/B, 1], zp; gather_axis=0,
                                  quantize_axis=2, block_size=B, bits), ids' shape + [H])
     (the same packed codes as the tied lm_head's MatMulNBits: the table is stored once)
MatMulNBits stores unsigned codes: signed codes are shifted by 2^(bits-1), its default zero point.
K not a multiple of the block: the last block is padded (MatMulNBits reads ceil(K / B) blocks).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from kvc.passes.base import KvcPass, PassReport

MS_DOMAIN = "com.microsoft"
_BITS = {ir.DataType.INT4: 4, ir.DataType.UINT4: 4, ir.DataType.INT8: 8, ir.DataType.UINT8: 8}
_SIGNED = {ir.DataType.INT4, ir.DataType.INT8}


class LowerOrtMatMulNBitsPass(KvcPass):
    name = "lower_ort_matmul_nbits"

    def apply(self, model: ir.Model) -> PassReport:
        graph = model.graph
        report = PassReport(self.name)
        packed: dict[int, tuple[ir.Value, ...]] = {}  # per DequantizeLinear node: MatMulNBits's inputs
        bits_seen: set[int] = set()
        for node in list(graph):
            if node.op_type == "MatMul" and node.domain == "":
                found = _weight_dequantize(graph, node.inputs[1])
                if found is None:
                    continue
                dq, axis = found
                bits_seen.add(_BITS[dq.inputs[0].const_value.dtype])
                if id(dq) not in packed:
                    packed[id(dq)] = _pack(graph, dq, axis)
                _replace_matmul(graph, node, dq, packed[id(dq)])
                report.matched += 1
            elif node.op_type == "Gather" and node.domain == "":
                dq = _embedding_dequantize(graph, node)
                if dq is None:
                    continue
                if id(dq) not in packed:
                    packed[id(dq)] = _pack(graph, dq, 1)
                _replace_gather(graph, node, dq, packed[id(dq)])
                report.matched += 1
        if 8 in bits_seen:
            report.notes.append("int8 weights: ONNX Runtime's exact 8-bit MatMulNBits (accuracy_level 0) has no fast "
                                "CPU path; decode measured ~10x slower than fp32 weights (int4 is faster than fp32)")
        if report.matched:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            graph.opset_imports.setdefault(MS_DOMAIN, 1)
            RemoveUnusedNodesPass()(model)  # the dequantize / transpose nodes and their codes
            graph.sort()
        return report


def _constant(graph: ir.Graph, value: ir.Value | None) -> bool:
    return value is None or (value.name in graph.initializers and value.const_value is not None)


def _blocked_dequantize(graph: ir.Graph, value: ir.Value | None) -> ir.Node | None:
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "DequantizeLinear" or node.domain != "":
        return None
    codes = node.inputs[0]
    if not all(_constant(graph, v) for v in node.inputs) or codes.const_value.dtype not in _BITS:
        return None
    if len(codes.shape) != 2 or node.attributes.get_int("block_size", 0) <= 0:
        return None
    if node.inputs[1].const_value.dtype != ir.DataType.FLOAT:
        return None
    return node


def _weight_dequantize(graph: ir.Graph, weight: ir.Value | None) -> tuple[ir.Node, int] | None:
    """(DequantizeLinear, its axis) when ``weight`` is a blocked dequantize along K, or its transpose."""
    producer = weight.producer() if weight is not None else None
    if producer is not None and producer.op_type == "Transpose" and producer.domain == "":
        perm = producer.attributes.get_ints("perm", None)
        dq = _blocked_dequantize(graph, producer.inputs[0])
        if dq is not None and list(perm or []) == [1, 0] and _axis(dq) == 1:
            return dq, 1
        return None
    dq = _blocked_dequantize(graph, weight)
    return (dq, 0) if dq is not None and _axis(dq) == 0 else None


def _axis(dq: ir.Node) -> int:
    return dq.attributes.get_int("axis", 1) % 2


def _unsigned_nk(dq: ir.Node, axis: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(codes [N, K], zero points [N, K/B] or None, scales [N, K/B]) as MatMulNBits reads them."""
    codes_value = dq.inputs[0].const_value
    bits = _BITS[codes_value.dtype]
    codes = codes_value.numpy().astype(np.int32)
    scale = dq.inputs[1].const_value.numpy()
    zp = dq.inputs[2].const_value.numpy().astype(np.int32) if len(dq.inputs) > 2 and dq.inputs[2] else None
    if codes_value.dtype in _SIGNED:
        codes = codes + (1 << (bits - 1))
        zp = None if zp is None else zp + (1 << (bits - 1))
    if axis == 0:
        codes, scale, zp = codes.T, scale.T, None if zp is None else zp.T
    return codes, zp, np.ascontiguousarray(scale, np.float32)


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Pairs along the last dim into one byte, the first value in the low nibble (odd length: 0-padded)."""
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros(values.shape[:-1] + (1,), values.dtype)], -1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def _pack(graph: ir.Graph, dq: ir.Node, axis: int) -> tuple[ir.Value, ...]:
    bits = _BITS[dq.inputs[0].const_value.dtype]
    block = dq.attributes.get_int("block_size")
    codes, zp, scale = _unsigned_nk(dq, axis)
    n, k = codes.shape
    padded = np.full((n, -(-k // block) * block), 1 << (bits - 1), np.int32)  # a partial last block: zeros
    padded[:, :k] = codes
    blocks = padded.reshape(n, -1, block)
    data = _pack_nibbles(blocks) if bits == 4 else blocks.astype(np.uint8)
    base = dq.inputs[0].name
    values = [_initializer(graph, data, f"{base}.nbits"), _initializer(graph, scale, f"{base}.nbits_scale")]
    if zp is not None:
        zp_data = _pack_nibbles(zp) if bits == 4 else zp.astype(np.uint8)
        values.append(_initializer(graph, zp_data, f"{base}.nbits_zero_point"))
    attrs = {"K": k, "N": n, "bits": bits, "block_size": block}
    return tuple(values) + (attrs,)


def _initializer(graph: ir.Graph, array: np.ndarray, name: str) -> ir.Value:
    if name in graph.initializers:  # a second Gather of the same table
        return graph.initializers[name]
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _replace_matmul(graph: ir.Graph, node: ir.Node, dq: ir.Node, packed: tuple) -> None:
    *inputs, attrs = packed
    new = ir.node("MatMulNBits", [node.inputs[0], *inputs], attributes=attrs, domain=MS_DOMAIN)
    graph.insert_before(node, new)
    _take_output(graph, node, new)


def _embedding_dequantize(graph: ir.Graph, gather: ir.Node) -> ir.Node | None:
    """The table's DequantizeLinear (blocks along H, whole blocks only: GatherBlockQuantized returns them all)."""
    dq = _blocked_dequantize(graph, gather.inputs[0])
    if dq is None or _axis(dq) != 1 or gather.attributes.get_int("axis", 0) != 0:
        return None
    return dq if int(dq.inputs[0].shape[1]) % dq.attributes.get_int("block_size") == 0 else None


def _replace_gather(graph: ir.Graph, gather: ir.Node, dq: ir.Node, packed: tuple) -> None:
    """GatherBlockQuantized over MatMulNBits's packed [V, H/B, B*bits/8] codes (one copy for a tied
    lm_head), blocks as the last axis: rows come out [..., H/B, B] and are reshaped to [..., H]."""
    data, scale, *zero_point, attrs = packed
    rows, blocks = attrs["N"], data.shape[1]
    tape = ir.tape.Tape(graph)
    scale3 = _initializer(graph, scale.const_value.numpy().reshape(rows, blocks, 1), f"{scale.name}.rows")
    inputs = [data, gather.inputs[1], scale3]
    if zero_point:
        zp = _unsigned_nk(dq, 1)[1]
        zp3 = _pack_nibbles(zp[..., None]) if attrs["bits"] == 4 else zp[..., None].astype(np.uint8)
        inputs.append(_initializer(graph, zp3, f"{zero_point[0].name}.rows"))
    ids = gather.inputs[1]
    blocked = tape.op("GatherBlockQuantized", inputs, domain=MS_DOMAIN,
                      attributes={"gather_axis": 0, "quantize_axis": 2, "block_size": attrs["block_size"],
                                  "bits": attrs["bits"]})
    if ids.shape is not None:  # a constant target (0: keep that dim), no shape arithmetic at run time
        target = np.array([0] * len(ids.shape) + [attrs["K"]], np.int64)
        shape = _initializer(graph, target, f"{data.name}.rows_shape{len(ids.shape)}")
    else:
        hidden = _initializer(graph, np.array([attrs["K"]], np.int64), f"{data.name}.row_width")
        shape = tape.op("Concat", [tape.op("Shape", [ids]), hidden], {"axis": 0})
    new_rows = tape.op("Reshape", [blocked, shape])
    _take_value(graph, gather, new_rows)


def _take_output(graph: ir.Graph, old_node: ir.Node, new_node: ir.Node) -> None:
    _take_value(graph, old_node, new_node.outputs[0])


def _take_value(graph: ir.Graph, old_node: ir.Node, new: ir.Value) -> None:
    old = old_node.outputs[0]
    new.dtype = ir.DataType.FLOAT
    if old.shape is not None:
        new.shape = old.shape
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    name = old.name
    graph.remove(old_node, safe=True)
    new.name = name
