"""TVM lowering: an int8 / dynamic-fp8 cache write (scale, quantize, two ring scatters) -> ai.kvc QuantizedRingWrite.

The quantize pass (kvc.passes.kv_quantize) writes each per-token-scaled cache as standard ONNX:
  scale   = Where(Equal(Div(ReduceMax(Abs(X), [-1], keepdims), qmax), 0), 1, Div(...))
  codes'  = TensorScatter(codes, QuantizeLinear(X, scale, blocked over head_dim), write_index, circular, axis 2)
  scales' = TensorScatter(scales, scale, write_index, circular, axis 2)
which the TVM engine would run as five kernels per cache per layer and step. This pass states the whole write
as one node,
  (codes', scales') = QuantizedRingWrite(codes, scales, X, write_index)   domain ai.kvc
whose converter (kvc.compiler.tvm.converters.quantized_ring_write) is one in-place kernel. Only exactly that
form is rewritten (qmax 127 for int8, 448 for float8e4m3fn, saturating, no zero point, the scale and the
codes read by nothing else); anything else stays as it is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from kvc.contract import KVC_DOMAIN, KVC_DOMAIN_VERSION, QUANTIZED_RING_WRITE_OP
from kvc.passes.base import KvcPass, PassReport
from kvc.passes.kv_codec import FP8_E4M3_MAX, INT8_MAX

STANDARD = ("", "ai.onnx")
QMAX = {ir.DataType.INT8: INT8_MAX, ir.DataType.FLOAT8E4M3FN: FP8_E4M3_MAX}


@dataclass(frozen=True)
class QuantizedWrite:
    codes_scatter: ir.Node
    scale_scatter: ir.Node
    values: ir.Value  # X [B, K, S, D]


class LowerTvmQuantizedWritesPass(KvcPass):
    name = "lower_tvm_quantized_writes"

    def apply(self, model: ir.Model) -> PassReport:
        report = PassReport(self.name)
        writes = [w for w in map(_quantized_write, list(model.graph)) if w is not None]
        for write in writes:
            _fuse(model.graph, write)
        report.matched = len(writes)
        if writes:
            model.opset_imports.setdefault(KVC_DOMAIN, KVC_DOMAIN_VERSION)
            model.graph.opset_imports.setdefault(KVC_DOMAIN, KVC_DOMAIN_VERSION)
            RemoveUnusedNodesPass()(model)
            model.graph.sort()
        return report


def _quantized_write(node: ir.Node) -> Optional[QuantizedWrite]:
    """The write ``node`` (the codes' TensorScatter) belongs to, if it is exactly the quantize pass's form."""
    if not _is_ring_scatter(node):
        return None
    quantize = node.inputs[1].producer()
    if not _is(quantize, "QuantizeLinear") or len(node.inputs[1].uses()) != 1:
        return None
    dtype = node.inputs[0].dtype
    values, scale = quantize.inputs[0], quantize.inputs[1]
    attrs = quantize.attributes
    if dtype not in QMAX or (len(quantize.inputs) > 2 and quantize.inputs[2] is not None) \
            or attrs.get_int("saturate", 1) != 1 or attrs.get_int("output_dtype", 0) != dtype \
            or attrs.get_int("axis", 1) not in (3, -1) or not _is_per_token_scale(scale, values, QMAX[dtype]):
        return None
    other_uses = [use.node for use in scale.uses() if use.node is not quantize]
    if len(other_uses) != 1:
        return None
    scale_scatter = other_uses[0]
    if not _is_ring_scatter(scale_scatter) or scale_scatter.inputs[1] is not scale \
            or scale_scatter.inputs[2] is not node.inputs[2] or scale_scatter.inputs[0].dtype != ir.DataType.FLOAT:
        return None
    return QuantizedWrite(node, scale_scatter, values)


def _is(node: Optional[ir.Node], op_type: str) -> bool:
    return node is not None and node.domain in STANDARD and node.op_type == op_type


def _is_ring_scatter(node: ir.Node) -> bool:
    return (_is(node, "TensorScatter") and node.attributes.get_string("mode", "linear") == "circular"
            and node.attributes.get_int("axis", -2) in (2, -2) and len(node.inputs) == 3
            and all(v is not None for v in node.inputs))


def _constant(value: Optional[ir.Value]) -> Optional[float]:
    tensor = value.const_value if value is not None else None
    if tensor is None:
        return None
    array = tensor.numpy()
    return float(array.reshape(-1)[0]) if array.size == 1 else None


def _is_per_token_scale(scale: ir.Value, values: ir.Value, qmax: float) -> bool:
    """scale == Where(Equal(ratio, 0), 1, ratio), ratio = Div(ReduceMax(Abs(values), [-1], keepdims=1), qmax)."""
    where = scale.producer()
    if not _is(where, "Where"):
        return False
    equal, one, ratio = where.inputs
    if not _is(equal.producer(), "Equal") or _constant(one) != 1.0 or equal.producer().inputs[0] is not ratio \
            or _constant(equal.producer().inputs[1]) != 0.0:
        return False
    divide = ratio.producer()
    if not _is(divide, "Div") or _constant(divide.inputs[1]) != qmax:
        return False
    reduce = divide.inputs[0].producer()
    if not _is(reduce, "ReduceMax") or reduce.attributes.get_int("keepdims", 1) != 1 or len(reduce.inputs) < 2:
        return False
    axes = reduce.inputs[1].const_value
    if axes is None or list(np.asarray(axes.numpy()).reshape(-1)) not in ([-1], [3]):
        return False
    absolute = reduce.inputs[0].producer()
    return _is(absolute, "Abs") and absolute.inputs[0] is values


def _fuse(graph: ir.Graph, write: QuantizedWrite) -> None:
    codes_node, scale_node = write.codes_scatter, write.scale_scatter
    fused = ir.Node(KVC_DOMAIN, QUANTIZED_RING_WRITE_OP,
                    [codes_node.inputs[0], scale_node.inputs[0], write.values, codes_node.inputs[2]],
                    num_outputs=2, name=f"{codes_node.name or 'cache'}_quantized_write")
    graph.append(fused)
    for old, new in ((codes_node.outputs[0], fused.outputs[0]), (scale_node.outputs[0], fused.outputs[1])):
        new.shape, new.type = old.shape, old.type
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        name, old.name = old.name, None
        new.name = name
    graph.remove([codes_node, scale_node], safe=True)
