"""KV-cache quantization of a ring-buffer graph (run after KvRingBufferPass).

Per cache (layer i, key or value), with U the new float32 K or V [B, K, S, D]:
  fp16 / bf16  cache in that dtype: TensorScatter(cache, Cast(U)) on write, Cast back to float32 on read.
  int8         symmetric per token per kv head: s = max|U| over D / 127 (0 -> 1),
               q = QuantizeLinear(U, s, axis=3, block_size=D, output_dtype=int8); q and s are written with
               TensorScatter into the cache and into its own float32 scale ring [B, K, C, 1];
               read: DequantizeLinear(cache, scale ring, axis=3, block_size=D).
  fp8 dynamic  the same with float8e4m3fn and 448.
  fp8 static   calibrated per-kv-head constants: QuantizeLinear / DequantizeLinear per axis (axis=1);
               no scale rings.
Standard QuantizeLinear/DequantizeLinear in the blocked form (opset 21+; block = one token's head_dim)
express a per-token per-head scale directly, and ONNX Runtime 1.31 CPU runs them for int8 and
float8e4m3fn with scales computed in-graph; so no Div/Round/Clip/Cast emulation is needed.
Every cache is written by a plain TensorScatter in its storage dtype (fp8 included); an engine that
cannot scatter some dtype lowers it afterwards (ONNX Runtime's fp8: kvc.passes.lower_ort_fp8_scatter).
numpy reference: kvc.passes.kv_codec.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from kvc.contract import KINDS, SCALE_SUFFIX, KvDtype, ScaleKind, past_name, past_scale_name, present_scale_name
from kvc.errors import GraphError
from kvc.passes.base import KvcPass, PassReport
from kvc.passes.kv_codec import qmax
from kvc.passes.kv_layout import Fp8Scales, KvCacheLayout, KvQuantOptions, ir_dtype

HEAD_AXIS, TOKEN_AXIS, DIM_AXIS = 1, 2, 3

__all__ = ["KvQuantOptions", "KvQuantizePass"]


@dataclass(frozen=True)
class CacheSite:
    """One cache ring in the graph: its input, the TensorScatter writing it and its readers."""

    layer: int
    kind: str
    past: ir.Value
    scatter: ir.Node
    readers: tuple[tuple[ir.Node, int], ...]  # (Attention node, input index)

    @property
    def update(self) -> ir.Value:
        return self.scatter.inputs[1]

    @property
    def write_index(self) -> ir.Value:
        return self.scatter.inputs[2]

    @property
    def present(self) -> ir.Value:
        return self.scatter.outputs[0]


class KvQuantizePass(KvcPass):
    name = "kv_quantize"
    changes_io = True

    def __init__(self, options: KvQuantOptions):
        super().__init__()
        self.options = options

    def apply(self, model: ir.Model) -> PassReport:
        report = PassReport(self.name)
        layout = KvCacheLayout.read_from(model)
        dtype = self.options.dtype
        if layout.dtype is not KvDtype.FP32:
            raise GraphError(f"the KV cache is already {layout.dtype.value}; quantize the fp32 ring graph once")
        if dtype is KvDtype.FP32:
            report.notes.append("fp32 cache: nothing to quantize")
            return report
        sites = [find_cache_site(model.graph, layer, kind) for layer in range(layout.num_layers) for kind in KINDS]
        if self.options.fp8_scales is not None:
            _check_static_scales(self.options.fp8_scales, layout)

        for site in sites:
            _QUANTIZERS[self.options.scale_kind](model.graph, site, self.options, layout)
        model.graph.sort()
        dataclasses.replace(layout, dtype=dtype, scales=self.options.scale_kind).write_to(model)
        report.matched = len(sites)
        report.notes.append(f"cache dtype {dtype.value}, scales {self.options.scale_kind.value}; "
                            f"{_FORMS[self.options.scale_kind]}")
        return report


# --- discovery --------------------------------------------------------------------------------

def find_cache_site(graph: ir.Graph, layer: int, kind: str) -> CacheSite:
    name = past_name(layer, kind)
    past = next((v for v in graph.inputs if v.name == name), None)
    if past is None:
        raise GraphError(f"{name} is missing from the ring graph's inputs; re-run the KV ring-buffer pass")
    uses = list(past.uses())
    scatter = uses[0][0] if len(uses) == 1 else None
    if scatter is None or scatter.op_type != "TensorScatter" or uses[0][1] != 0:
        raise GraphError(f"{name} is not written by one TensorScatter; re-run the KV ring-buffer pass on the "
                         "unquantized graph")
    present = scatter.outputs[0]
    if not present.is_graph_output():
        raise GraphError(f"the updated {name} is not a graph output; re-run the KV ring-buffer pass")
    readers = tuple((n, i) for n, i in present.uses() if n.op_type == "Attention" and i in (1, 2))
    if len(readers) != len(list(present.uses())) or not readers:
        raise GraphError(f"the updated {name} is read by nodes other than Attention; cannot insert a dequantize")
    if past.dtype != ir.DataType.FLOAT:
        raise GraphError(f"{name}: KV quantization expects a float32 cache, got {past.dtype}; "
                         "quantize the ring graph of a float32 model")
    return CacheSite(layer, kind, past, scatter, readers)


def _check_static_scales(scales: Fp8Scales, layout: KvCacheLayout) -> None:
    for table_name, table in (("key", scales.key), ("value", scales.value)):
        if len(table) != layout.num_layers or any(len(row) != layout.num_kv_heads for row in table):
            shape = [len(row) for row in table]
            raise GraphError(f"fp8 {table_name} scales have per-layer head counts {shape}; the model has "
                             f"{layout.num_layers} layers x {layout.num_kv_heads} kv heads: re-run kvc calibrate "
                             "on this model")


# --- rewrites ---------------------------------------------------------------------------------

def _retype(value: ir.Value, dtype: ir.DataType) -> None:
    """A fresh type object: Value.dtype = ... would mutate a TensorType other values may share."""
    value.type = ir.TensorType(dtype)


def _set_cache_dtype(site: CacheSite, dtype: ir.DataType) -> None:
    _retype(site.past, dtype)
    _retype(site.present, dtype)


def _read_through(site: CacheSite, value: ir.Value) -> None:
    for node, index in site.readers:
        node.replace_input_with(index, value)


def _quantize_cast(graph: ir.Graph, site: CacheSite, options: KvQuantOptions, layout: KvCacheLayout) -> None:
    """fp16 / bf16: store in the narrow float type, cast back for attention."""
    tape = ir.tape.Tape(graph)
    dtype = ir_dtype(options.dtype)
    site.scatter.replace_input_with(1, tape.op("Cast", [site.update], {"to": dtype}))
    _set_cache_dtype(site, dtype)
    _read_through(site, tape.op("Cast", [site.present], {"to": ir.DataType.FLOAT}))


def _quantize_per_token(graph: ir.Graph, site: CacheSite, options: KvQuantOptions, layout: KvCacheLayout) -> None:
    """int8 / dynamic fp8: per-token per-head scales computed in-graph, kept in their own ring."""
    tape = ir.tape.Tape(graph)
    dtype = ir_dtype(options.dtype)
    scale_new = _per_token_scale(tape, graph, site, options.dtype)
    blocked = {"axis": DIM_AXIS, "block_size": layout.head_dim}
    quantized = tape.op("QuantizeLinear", [site.update, scale_new], {**blocked, "output_dtype": dtype})
    present = _write_quantized(site, quantized, dtype)
    scale_present = _add_scale_ring(graph, tape, site, scale_new, layout, present)
    _read_through(site, tape.op("DequantizeLinear", [present, scale_present], blocked))


def _quantize_static(graph: ir.Graph, site: CacheSite, options: KvQuantOptions, layout: KvCacheLayout) -> None:
    """fp8 with calibrated per-kv-head scales: constants in the graph, no scale I/O."""
    tape = ir.tape.Tape(graph)
    scales = options.fp8_scales.key if site.kind == "key" else options.fp8_scales.value
    scale = tape.initializer(ir.tensor(np.asarray(scales[site.layer], np.float32),
                                       name=f"kvc_quant.{site.layer}.{site.kind}{SCALE_SUFFIX}"))
    per_head = {"axis": HEAD_AXIS}
    quantized = tape.op("QuantizeLinear", [site.update, scale], {**per_head, "output_dtype": ir_dtype(options.dtype)})
    present = _write_quantized(site, quantized, ir_dtype(options.dtype))
    _read_through(site, tape.op("DequantizeLinear", [present, scale], per_head))


def _per_token_scale(tape: ir.tape.Tape, graph: ir.Graph, site: CacheSite, dtype: KvDtype) -> ir.Value:
    def const(name: str, array: np.ndarray) -> ir.Value:
        full = f"kvc_quant.{name}"
        existing = graph.initializers.get(full)
        return existing if existing is not None else tape.initializer(ir.tensor(array, name=full))

    last_axis = const("last_axis", np.array([-1], np.int64))
    amax = tape.op("ReduceMax", [tape.op("Abs", [site.update]), last_axis], {"keepdims": 1})
    scale = tape.op("Div", [amax, const(f"qmax_{dtype.value}", np.array(qmax(dtype), np.float32))])
    zero, one = const("zero", np.array(0, np.float32)), const("one", np.array(1, np.float32))
    return tape.op("Where", [tape.op("Equal", [scale, zero]), one, scale])  # all-zero token: scale 1


def _write_quantized(site: CacheSite, quantized: ir.Value, dtype: ir.DataType) -> ir.Value:
    """Scatter ``quantized`` into the ring (stored as ``dtype``); returns the updated cache (the graph output)."""
    site.scatter.replace_input_with(1, quantized)
    _set_cache_dtype(site, dtype)
    return site.present


def _add_scale_ring(graph: ir.Graph, tape: ir.tape.Tape, site: CacheSite, scale_new: ir.Value,
                    layout: KvCacheLayout, cache_output: ir.Value) -> ir.Value:
    """A float32 [B, K, C, 1] ring beside the cache, as an input/output pair next to the cache's."""
    batch = site.past.shape[0]
    shape = ir.Shape([batch, layout.num_kv_heads, layout.capacity, 1])
    past_scale = ir.val(past_scale_name(site.layer, site.kind), ir.DataType.FLOAT, shape)
    graph.inputs.insert(list(graph.inputs).index(site.past) + 1, past_scale)
    present_scale = tape.op("TensorScatter", [past_scale, scale_new, site.write_index],
                            {"mode": "circular", "axis": TOKEN_AXIS})
    present_scale.name = present_scale_name(site.layer, site.kind)
    present_scale.shape = shape
    _retype(present_scale, ir.DataType.FLOAT)
    graph.outputs.insert(list(graph.outputs).index(cache_output) + 1, present_scale)
    return present_scale


_FORMS = {ScaleKind.NONE: "Cast on write, Cast to float32 on read",
          ScaleKind.PER_TOKEN: "QuantizeLinear/DequantizeLinear, blocked over head_dim (one scale per token "
                               "per kv head), scales in their own TensorScatter ring",
          ScaleKind.STATIC_PER_HEAD: "QuantizeLinear/DequantizeLinear per axis (kv heads), constant scales"}
_QUANTIZERS = {ScaleKind.NONE: _quantize_cast, ScaleKind.PER_TOKEN: _quantize_per_token,
               ScaleKind.STATIC_PER_HEAD: _quantize_static}
