"""ONNX -> Relax: TVM's importer, with kvc's converters for the fused standard ops.

TVM 0.27's importer has no RotaryEmbedding or TensorScatter, maps ``Attention`` to the com.microsoft
op, builds RMSNormalization wrongly for axis 0 and refuses blocked QuantizeLinear/DequantizeLinear
(see kvc.compiler.tvm.converters). Rather than patching TVM's module-level converter table, a
subclass of its graph importer consults kvc's table first, for standard-domain nodes only; every
other op goes to TVM's own converter. Nothing global changes, so this is safe next to other users.

This module's ``from_onnx`` is the one route from ONNX into Relax: the engine build
(kvc.compiler.tvm.build) and the tests call it, with ``ImportOptions`` saying what differs.

All graph inputs get explicit shapes up front: a dim named in ``shape_dict`` or by ``dim_param``
becomes one shared symbolic ``tir.Var`` per name, so e.g. every "batch" dim is the same variable.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace

import onnx
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

from kvc.compiler.tvm.converters import CONVERTERS, KVC_CONVERTERS
from kvc.compiler.tvm.converters.common import CONTEXT_KEY, NodeContext
from kvc.compiler.tvm.target import TargetKind
from kvc.contract import KVC_DOMAIN
from kvc.errors import GraphError

STANDARD_DOMAINS = ("", "ai.onnx")
# Ops whose TVM converters accept symbolic shape values (relax.ShapeExpr), as listed in TVM's importer;
# any other op gets such an input as an int64 tensor (TVM would refuse the node).
SHAPE_AWARE_OPS = {"Reshape", "Resize", "ConstantOfShape", "Gather", "Slice", "Shape", "Expand", "Concat",
                   "Equal", "Where", "Cast", "CastLike", "Squeeze",
                   "Range"}  # kvc's Range converter keeps symbolic bounds
HANDLED_BY_IMPORTER = {"If", "Constant"}  # TVM's importer handles these outside its converter table
TENSOR_ALIAS = "::kvc_shape_tensor"  # key suffix, in the importer's value table, of a shape value as a tensor
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

ShapeDict = Mapping[str, "list[int | str | tvm.tirx.Var]"]


@dataclass(frozen=True)
class ImportOptions:
    keep_params_in_input: bool = False  # initializers as trailing parameters instead of folded constants
    in_place_cache_writes: bool = False  # ring writes to a cache parameter via call_tir_inplace (the engine build)
    target_kind: TargetKind = TargetKind.LLVM  # what the module will be built for
    attention_kernels: bool = True  # kvc's TIR kernels for ring-buffer Attention (attention_kernels.py;
    #                                 CPU kernels on llvm, kernels.gpu_attention on CUDA)
    kernel_chunk_size: int = 64  # cache slots per step / per parallel task in those kernels
    prefill_query_tile: int = 16  # queries per parallel task in the prefill kernel
    hardware_half: bool = False  # the llvm target converts float16 in hardware (F16C): fp8 caches decode through it
    avx512_int16: bool = False  # the llvm target has AVX-512 BW: int8 caches' decode attention multiplies integers

    @property
    def uses_attention_kernels(self) -> bool:
        return self.attention_kernels and self.target_kind is TargetKind.LLVM

    @property
    def uses_gpu_attention_kernels(self) -> bool:
        return self.attention_kernels and self.target_kind is TargetKind.CUDA


class KvcGraphImporter(tvm_onnx.ONNXGraphImporter):
    """TVM's ONNXGraphImporter with an extra converter table that takes precedence."""

    def __init__(self, converters: Mapping[str, type], shape_dict: dict,
                 options: ImportOptions):
        super().__init__(shape_dict, dtype_dict="float32", keep_params_in_input=options.keep_params_in_input)
        self._kvc_converters = dict(converters)
        self._kvc_options = options
        self._shared: dict = {}  # NodeContext.shared

    def _construct_nodes(self, graph: onnx.GraphProto) -> None:
        """TVM's node loop, one node at a time, after giving shape values to ops that need tensors.

        TVM's ``Shape`` yields a ShapeExpr and its loop refuses one in e.g. Add, Range or Unsqueeze,
        which is exactly what a dynamic-length attention graph does (past_len + Shape(K)[2])."""
        for node in graph.node:
            super()._construct_nodes(SimpleNamespace(node=[self._with_tensor_shapes(node)]))

    def _with_tensor_shapes(self, node: onnx.NodeProto) -> onnx.NodeProto:
        if node.op_type in SHAPE_AWARE_OPS:
            return node
        shape_inputs = [name for name in node.input
                        if name and isinstance(getattr(self._nodes.get(name), "ty", None), relax.ShapeType)]
        if not shape_inputs:
            return node
        for name in shape_inputs:
            alias = f"{name}{TENSOR_ALIAS}"
            if alias not in self._nodes:
                self._nodes[alias] = self.bb.normalize(relax.op.shape_to_tensor(self._nodes[name]))
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[:] = [f"{name}{TENSOR_ALIAS}" if name in shape_inputs else name for name in node.input]
        return copy

    def _check_for_unsupported_ops(self, graph: onnx.GraphProto) -> None:
        known = set(tvm_onnx._get_convert_map()) | set(self._kvc_converters) | HANDLED_BY_IMPORTER
        missing = sorted({node.op_type for node in graph.node} - known)
        if missing:
            raise GraphError(f"TVM cannot import ONNX op(s) {', '.join(missing)}; "
                             "use the ort engine or rewrite them into supported ops")

    def _convert_operator(self, op_name: str, inputs, attrs: dict, opset: int):
        converter = self._kvc_converters.get(op_name)
        if converter is None:
            return super()._convert_operator(op_name, inputs, attrs, opset)
        attrs[CONTEXT_KEY] = self._context(op_name)
        result = converter.get_converter(opset)(self.bb, inputs, attrs, [self._nodes, self._params])
        return self.bb.normalize(result) if isinstance(result, relax.Expr) else result

    def _context(self, op_name: str) -> NodeContext:
        options = self._kvc_options
        return NodeContext(attention_kernels=options.uses_attention_kernels,
                           gpu_attention_kernels=options.uses_gpu_attention_kernels,
                           kernel_chunk_size=options.kernel_chunk_size, prefill_query_tile=options.prefill_query_tile,
                           hardware_half=options.hardware_half and options.target_kind is TargetKind.LLVM,
                           avx512_int16=options.avx512_int16 and options.target_kind is TargetKind.LLVM,
                           shared=self._shared)


def from_onnx(model: onnx.ModelProto, shape_dict: ShapeDict | None = None,
              options: ImportOptions = ImportOptions()) -> tvm.IRModule:
    """Import ``model`` into a Relax IRModule with a ``main`` function.

    shape_dict maps input names to dims (ints, names of symbolic dims, or tir.Vars); inputs not named
    there keep their ONNX shape, with dim_param names as symbolic dims. Pinning the new-token dim to 1
    (e.g. {"input_ids": ["batch", 1], "position_ids": ["batch", 1]}) gives the decode entry point.
    ai.kvc CacheAttention nodes (kvc's TVM lowering) use kvc's prefill / decode kernels for the
    options' target kind (CPU or GPU kernels): pass the target kind when building for CUDA. ``options.keep_params_in_input`` makes
    initializers trailing function parameters (values in the function's "params" attribute) instead
    of folded constants; ``options.in_place_cache_writes`` writes ring caches in place.
    """
    if model.ir_version < 3:
        raise GraphError(f"ONNX IR version {model.ir_version} is too old; re-export with a current exporter")
    graph = model.graph
    importer = KvcGraphImporter(_converters(graph, options), _input_shapes(graph, shape_dict or {}), options)
    mod = importer.from_onnx(graph, _default_opset(model))
    return relax.transform.DeadCodeElimination()(mod)  # e.g. cache dequantizations the kernels made unused


def _converters(graph: onnx.GraphProto, options: ImportOptions) -> dict[str, type]:
    converters = _standard_domain_converters(graph)
    for node in graph.node:
        if node.domain == KVC_DOMAIN:
            if node.op_type not in KVC_CONVERTERS:
                raise GraphError(f"{node.name}: {KVC_DOMAIN} has no op {node.op_type!r} (this graph comes from "
                                 "another kvc version; recompile it from its ONNX export)")
            converters[node.op_type] = KVC_CONVERTERS[node.op_type]
    if options.in_place_cache_writes:
        from kvc.compiler.tvm.inplace import InPlaceTensorScatter

        converters["TensorScatter"] = InPlaceTensorScatter
    return converters


def _standard_domain_converters(graph: onnx.GraphProto) -> dict[str, type]:
    """kvc's converters, minus ops that this graph uses from another domain (e.g. com.microsoft
    Attention), which TVM's table converts; the two forms of one op type in a graph cannot be told apart."""
    domains: dict[str, set[str]] = {}
    for node in graph.node:
        if node.op_type in CONVERTERS:
            domains.setdefault(node.op_type, set()).add(node.domain)
    converters = dict(CONVERTERS)
    for op_type, seen in domains.items():
        standard = seen & set(STANDARD_DOMAINS)
        if standard and seen - standard:
            raise GraphError(f"the graph mixes {op_type} from domains {sorted(seen)}; "
                             "rename the custom-domain one before importing into TVM")
        if not standard:
            del converters[op_type]
    return converters


def _default_opset(model: onnx.ModelProto) -> int:
    for opset in model.opset_import:
        if opset.domain in STANDARD_DOMAINS:
            return opset.version
    return 1


def _input_shapes(graph: onnx.GraphProto, shape_dict: ShapeDict) -> dict[str, list]:
    """Shapes of all real graph inputs, with one shared tir.Var per symbolic dim name."""
    initializers = {init.name for init in graph.initializer}
    symbols: dict[str, tvm.tirx.Var] = {}
    shapes = {}
    for value in graph.input:
        if value.name in initializers:
            continue
        if value.name in shape_dict:
            dims = list(shape_dict[value.name])
        elif value.type.tensor_type.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else d.dim_param or f"{value.name}_dim{i}"
                    for i, d in enumerate(value.type.tensor_type.shape.dim)]
        else:
            continue  # unknown rank: TVM's importer warns and keeps it unshaped
        shapes[value.name] = [_dim(d, symbols) for d in dims]
    unknown = set(shape_dict) - {v.name for v in graph.input}
    if unknown:
        raise GraphError(f"shape_dict names {sorted(unknown)}, which are not graph inputs")
    return shapes


def _dim(dim, symbols: dict[str, tvm.tirx.Var]):
    if isinstance(dim, str):
        if IDENTIFIER.match(dim):
            return symbols.setdefault(dim, tvm.tirx.Var(dim, "int64"))
        return tvm_onnx.parse_shape_name(dim, symbols)  # e.g. "past_len + 1"
    if isinstance(dim, tvm.tirx.Var):
        return symbols.setdefault(dim.name, dim)
    return int(dim)
