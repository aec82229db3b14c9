"""TVM lowering: ring-buffer Attention reading a decoded cache -> ai.kvc CacheAttention on the stored cache.

After the KV passes, each layer's attention reads its cache through the codec the quantize pass wrote:
  Attention(Q, DequantizeLinear(int8 | fp8 ring, scale), DequantizeLinear(...), mask, nonpad_kv_seqlen)
  Attention(Q, Cast(fp16 ring -> float32), ..., mask, nonpad_kv_seqlen)
  Attention(Q, fp32 ring, fp32 ring, mask, nonpad_kv_seqlen)
The TVM engine's attention kernels decode slot by slot inside attention, never materialising a
float32 copy of the ring. This pass states that in the graph, once, here (where the codec's form is
known): the node becomes
  CacheAttention(Q, K stored, V stored, mask, nonpad_kv_seqlen, K scale, V scale)   domain ai.kvc
  attributes: Attention's own, plus scale_layout = none | per_token | per_head
and the decoders are removed when nothing else reads them. Its meaning is exactly the Attention it
replaces; the TVM converter (kvc.compiler.tvm.converters.cache_attention) emits kvc's kernels for it,
or the same dequantize-then-attend computation where the kernels do not apply (e.g. CUDA).

Only the form the kernels implement is rewritten: no past inputs, one output, no softcap, no window;
anything else stays a standard Attention (the notes say why).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from kvc.contract import CACHE_ATTENTION_OP, KVC_DOMAIN, KVC_DOMAIN_VERSION
from kvc.passes.base import KvcPass, PassReport

STANDARD = ("", "ai.onnx")
QUANTIZED = (ir.DataType.INT8, ir.DataType.FLOAT8E4M3FN)
FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


@dataclass(frozen=True)
class StoredRead:
    """How attention reads one cache: the stored ring, its scale (if any) and the scale's layout."""

    stored: ir.Value
    scale: Optional[ir.Value]
    layout: str  # none | per_token | per_head (kvc.compiler.tvm.kernels.kv_read.ScaleLayout values)


def stored_read(value: ir.Value) -> StoredRead | str:
    """What ``value`` (Attention's K or V) decodes, or why it is not a cache read the kernels take."""
    producer = value.producer()
    if producer is not None and producer.domain in STANDARD and producer.op_type == "DequantizeLinear":
        return _dequantized(producer)
    if producer is not None and producer.domain in STANDARD and producer.op_type == "Cast":
        source, to = producer.inputs[0], producer.attributes.get_int("to", 0)
        if source.dtype == ir.DataType.FLOAT16 and to == ir.DataType.FLOAT:
            return StoredRead(source, None, "none")
    if value.dtype in FLOATS:
        return StoredRead(value, None, "none")
    return f"{value.name} is {value.dtype}, not a float or decoded cache"


def _dequantized(node: ir.Node) -> StoredRead | str:
    stored, scale = node.inputs[0], node.inputs[1]
    zero_point = node.inputs[2] if len(node.inputs) > 2 else None
    if zero_point is not None or stored.dtype not in QUANTIZED or scale.dtype != ir.DataType.FLOAT:
        return f"{node.name}: not a zero-point-free int8/fp8 decode with float32 scales"
    if stored.shape is None or scale.shape is None or len(stored.shape) != 4:
        return f"{node.name}: cache or scale shape unknown"
    axis = node.attributes.get_int("axis", 1) % 4
    block = node.attributes.get_int("block_size", 0)
    if block and axis == 3 and block == stored.shape[3] and len(scale.shape) == 4 and scale.shape[3] == 1:
        return StoredRead(stored, scale, "per_token")
    if not block and axis == 1 and len(scale.shape) == 1:
        return StoredRead(stored, scale, "per_head")
    return f"{node.name}: scale layout (axis {axis}, block {block}) is neither per token nor per head"


def why_not_kernel_form(node: ir.Node) -> str | None:
    """None when ``node`` is the ring-buffer Attention the kernels implement; else the reason."""
    inputs = list(node.inputs) + [None] * (7 - len(node.inputs))
    if inputs[6] is None:
        return "no nonpad_kv_seqlen (not the ring-buffer form)"
    if inputs[4] is not None or inputs[5] is not None:
        return "past_key/past_value inputs (not the ring-buffer form)"
    if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return "its present or qk outputs are used"
    if node.attributes.get_float("softcap", 0.0) > 0:
        return "softcap"
    if node.attributes.get_int("left_window_size", -1) >= 0 or node.attributes.get_int("right_window_size", -1) >= 0:
        return "a window"
    q = inputs[0]
    if q.dtype not in FLOATS or q.shape is None or len(q.shape) != 4:
        return "Q is not a 4-D float tensor"
    return None


class LowerTvmCacheAttentionPass(KvcPass):
    name = "lower_tvm_cache_attention"
    ort_runnable = False  # CacheAttention is the TVM engine's own op

    def apply(self, model: ir.Model) -> PassReport:
        report = PassReport(self.name)
        for node in list(model.graph):
            if node.domain not in STANDARD or node.op_type != "Attention":
                continue
            reason = why_not_kernel_form(node)
            reads = [stored_read(node.inputs[1]), stored_read(node.inputs[2])]
            if reason is None:
                reason = next((r for r in reads if isinstance(r, str)), None)
            if reason is None and len({(r.stored.dtype, r.layout) for r in reads}) != 1:
                reason = "K and V are stored differently"
            if reason is not None:
                report.notes.append(f"{node.name}: left as Attention ({reason})")
                continue
            _replace(model, node, reads[0], reads[1])
            report.matched += 1
        if report.matched:
            model.opset_imports.setdefault(KVC_DOMAIN, KVC_DOMAIN_VERSION)
            model.graph.opset_imports.setdefault(KVC_DOMAIN, KVC_DOMAIN_VERSION)
            RemoveUnusedNodesPass()(model)
        return report


def _replace(model: ir.Model, node: ir.Node, key: StoredRead, value: StoredRead) -> None:
    q, mask, nonpad = node.inputs[0], node.inputs[3], node.inputs[6]
    attributes = [a for a in node.attributes.values()] + [ir.AttrString("scale_layout", key.layout)]
    lowered = ir.Node(KVC_DOMAIN, CACHE_ATTENTION_OP,
                      [q, key.stored, value.stored, mask, nonpad, key.scale, value.scale],
                      attributes=attributes, name=node.name, num_outputs=1)
    out, new = node.outputs[0], lowered.outputs[0]
    new.shape, new.type = out.shape, out.type
    graph = model.graph
    graph.insert_before(node, lowered)
    name = out.name
    out.replace_all_uses_with(new, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    new.name = name
