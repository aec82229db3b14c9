"""Validation of input graphs, each failure a GraphError that names the problem and the fix.

Two families of checks:
  * ``load_model_checked(path)``: the file is a parseable ONNX model and every external-data
    reference stays inside the model's directory (relative, no symlink, long enough).
  * ``check_ring_input(model)``: the graph has the fused, explicit-KV form the ring-buffer pass
    rewrites: past_key_values.{i}.key/value inputs paired with present.{i}.key/value outputs,
    one ONNX Attention per layer consuming them (directly or through Hugging Face's sliding-window
    crops, kvc.passes.cache_crop), whole GQA groups, a supported head size.
Checks only read; they never modify the model, so a failing pass leaves it as it was.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx.external_data_helper import ExternalDataInfo
from onnx_ir.passes.common import ShapeInferencePass

from kvc.contract import PAST_PREFIX, PAST_RE, PRESENT_RE, past_name, present_name
from kvc.errors import GraphError
from kvc.passes.cache_crop import crop_of

MAX_HEAD_DIM = 256  # widest head the attention kernels (TVM tiles, ORT flash paths) are planned for
ATTENTION_OP = ("", "Attention")
PAST_KEY_INPUT, PAST_VALUE_INPUT = 4, 5  # ONNX Attention input slots
PRESENT_KEY_OUTPUT, PRESENT_VALUE_OUTPUT = 1, 2
FUSE_HINT = "run the fusion passes first (kvc.passes.fusion_pipeline.run_fusions)"


@dataclass(frozen=True)
class KvLayerIO:
    """One layer's cache inputs and outputs."""

    layer: int
    past_key: ir.Value
    past_value: ir.Value
    present_key: ir.Value
    present_value: ir.Value


@dataclass(frozen=True)
class FusedLayer:
    """A layer whose attention is the fused ONNX Attention with past/present key and value."""

    io: KvLayerIO
    attention: ir.Node
    num_heads: int | None  # None when Q's head dimension is symbolic
    num_kv_heads: int
    head_dim: int
    crops: tuple[ir.Node, ...] = ()  # sliding-window crops around the cache I/O (kvc.passes.cache_crop)
    crop_window: int | None = None  # the window they apply


# --- graph structure -------------------------------------------------------------------------

def find_kv_layers(graph: ir.Graph) -> list[KvLayerIO]:
    """Pair past_key_values.{i}.* inputs with present.{i}.* outputs; layers must be 0..L-1."""
    pasts = _match_names((v for v in graph.inputs), PAST_RE)
    presents = _match_names((v for v in graph.outputs), PRESENT_RE)
    if not pasts:
        raise GraphError(f"this graph has no {PAST_PREFIX}* inputs, so it has no KV cache to rewrite: "
                         "export with `kvc export` (explicit past key/values) or with optimum's "
                         "text-generation-with-past task")
    _check_pairs(pasts, presents)
    layers = sorted({layer for layer, _ in pasts})
    if layers != list(range(len(layers))):
        raise GraphError(f"past_key_values layer indices {layers} are not 0..{len(layers) - 1}; "
                         "the graph's cache inputs are misnamed: re-export it")
    return [KvLayerIO(i, pasts[(i, "key")], pasts[(i, "value")], presents[(i, "key")], presents[(i, "value")])
            for i in layers]


def _match_names(values: Iterator[ir.Value], pattern) -> dict[tuple[int, str], ir.Value]:
    found = {}
    for value in values:
        m = pattern.match(value.name or "")
        if m:
            found[(int(m.group(1)), m.group(2))] = value
    return found


def _check_pairs(pasts: dict, presents: dict) -> None:
    for layer, kind in sorted(pasts):
        other = "value" if kind == "key" else "key"
        if (layer, other) not in pasts:
            raise GraphError(f"{past_name(layer, kind)} has no matching {past_name(layer, other)} input; "
                             "every layer needs both key and value caches: re-export the model")
        if (layer, kind) not in presents:
            raise GraphError(f"{past_name(layer, kind)} has no matching {present_name(layer, kind)} output; "
                             "past and present caches must come in pairs: re-export the model")
    for layer, kind in sorted(presents):
        if (layer, kind) not in pasts:
            raise GraphError(f"{present_name(layer, kind)} has no matching {past_name(layer, kind)} input; "
                             "past and present caches must come in pairs: re-export the model")


@dataclass(frozen=True)
class FusedAttention:
    """A layer's Attention node and the sliding-window crops between it and the cache I/O, if any."""

    node: ir.Node
    crops: tuple[ir.Node, ...]  # the four Slice nodes of a cropped cache (kvc.passes.cache_crop), or none
    window: int | None  # the window those crops apply


def find_fused_attention(io: KvLayerIO) -> FusedAttention:
    """The ONNX Attention node that takes this layer's past key/value and returns its presents, looking
    through Hugging Face's sliding-window crops (past -> Slice -> Attention -> Slice -> present)."""
    where = f"layer {io.layer}"
    crops: list[ir.Node] = []
    keeps: set[int] = set()
    past_key, past_value = (_past_as_read(past, crops, keeps) for past in (io.past_key, io.past_value))
    node = _single_consumer(past_key)
    if node is None or (node.domain, node.op_type) != ATTENTION_OP:
        ops = sorted({n.op_type for n, _ in past_key.uses()}) or ["nothing"]
        raise GraphError(f"{where}: attention is not fused ({io.past_key.name} feeds {', '.join(ops)}, not an "
                         f"ONNX Attention node's past_key input); the ring-buffer pass needs the fused form: "
                         f"{FUSE_HINT}")
    expected = {(past_key, PAST_KEY_INPUT), (past_value, PAST_VALUE_INPUT)}
    actual = {(v, i) for i, v in enumerate(node.inputs) if v is past_key or v is past_value}
    if actual != expected or list(past_value.uses()) != [(node, PAST_VALUE_INPUT)]:
        raise GraphError(f"{where}: {io.past_key.name}/{io.past_value.name} are not the past_key/past_value "
                         f"inputs of one Attention node ({node.name}); {FUSE_HINT}")
    presents = [_present_as_written(node, index, present, crops, keeps)
                for index, present in ((PRESENT_KEY_OUTPUT, io.present_key), (PRESENT_VALUE_OUTPUT, io.present_value))]
    if len(node.outputs) < 3 or None in presents:
        raise GraphError(f"{where}: {io.present_key.name}/{io.present_value.name} are not the present outputs of "
                         f"the Attention node {node.name}; {FUSE_HINT}")
    if crops and (len(crops) != 4 or len(keeps) != 1):
        raise GraphError(f"{where}: only some of {io.past_key.name}, {io.past_value.name}, {io.present_key.name}, "
                         f"{io.present_value.name} are cropped to a sliding window, or to different lengths "
                         f"(Slice nodes {', '.join(c.name or '?' for c in crops)}); kvc cannot tell the window")
    return FusedAttention(node, tuple(crops), keeps.pop() + 1 if crops else None)


def _single_consumer(value: ir.Value) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) != 1 or uses[0][1] != PAST_KEY_INPUT:
        return None
    return uses[0][0]


def _past_as_read(past: ir.Value, crops: list[ir.Node], keeps: set[int]) -> ir.Value:
    """What the Attention reads: the past itself, or its crop."""
    crop = crop_of(past)
    if crop is None:
        return past
    crops.append(crop[0])
    keeps.add(crop[1])
    return crop[0].outputs[0]


def _present_as_written(node: ir.Node, index: int, present: ir.Value, crops: list[ir.Node],
                       keeps: set[int]) -> ir.Value | None:
    """The Attention's present output when it is the graph output itself or is cropped into it."""
    if len(node.outputs) <= index:
        return None
    output = node.outputs[index]
    if output is present:
        return output
    crop = crop_of(output)
    if crop is None or crop[0].outputs[0] is not present:
        return None
    crops.append(crop[0])
    keeps.add(crop[1])
    return output


def check_head_counts(num_heads: int | None, num_kv_heads: int, where: str) -> None:
    if num_heads is not None and num_heads % num_kv_heads:
        raise GraphError(f"{where}: {num_heads} query heads are not divisible by {num_kv_heads} kv heads; "
                         "grouped-query attention needs whole groups: fix the model config and re-export")


def check_head_dim(head_dim: int | None, where: str) -> None:
    if not isinstance(head_dim, int):
        raise GraphError(f"{where}: head size {head_dim!r} is not a fixed number; re-export with static head_dim")
    if head_dim < 2 or head_dim % 2 or head_dim > MAX_HEAD_DIM:
        raise GraphError(f"{where}: unsupported head size {head_dim}: kvc supports even head sizes from 2 to "
                         f"{MAX_HEAD_DIM}; this model cannot be compiled")


def _static_dim(value: ir.Value, axis: int) -> int | None:
    shape = value.shape
    if shape is None or len(shape) <= axis or not isinstance(shape[axis], int):
        return None
    return shape[axis]


def check_fused_layer(io: KvLayerIO, query_heads: int | None) -> FusedLayer:
    fused = find_fused_attention(io)
    node = fused.node
    where = f"layer {io.layer}"
    if node.attributes.get("q_num_heads") is not None or _rank(node.inputs[1]) not in (None, 4):
        raise GraphError(f"{where}: Attention takes 3-D key/value; the ring-buffer pass needs 4-D "
                         "[batch, kv_heads, seq, head_dim]: re-run the fusion passes")
    if len(node.outputs) > 3 and node.outputs[3] is not None and node.outputs[3].uses():
        raise GraphError(f"{where}: the Attention's qk_matmul_output is used; the ring-buffer pass drops it")
    kv_heads, head_dim = _static_dim(io.past_key, 1), _static_dim(io.past_key, 3)
    if kv_heads is None:
        raise GraphError(f"{where}: {io.past_key.name} has no fixed kv-head count (dim 1); re-export with static heads")
    check_head_dim(head_dim, where)
    check_head_counts(query_heads, kv_heads, where)
    return FusedLayer(io, node, query_heads, kv_heads, head_dim, fused.crops, fused.window)


def query_heads(model: ir.Model, layers: list[KvLayerIO]) -> list[int | None]:
    """Query heads per layer from Q's shape; when the graph does not say, from ONNX shape inference
    on a clone (tensors shared, so it is cheap and the model itself stays untouched)."""
    heads = [_static_dim(find_fused_attention(io).node.inputs[0], 1) for io in layers]
    if None not in heads:
        return heads
    clone = model.clone()
    ShapeInferencePass()(clone)
    cloned = find_kv_layers(clone.graph)
    return [_static_dim(find_fused_attention(io).node.inputs[0], 1) for io in cloned]


def _rank(value: ir.Value | None) -> int | None:
    return None if value is None or value.shape is None else len(value.shape)


def check_ring_input(model: ir.Model) -> list[FusedLayer]:
    """All checks the ring-buffer pass needs before it touches the graph."""
    kv_layers = find_kv_layers(model.graph)
    layers = [check_fused_layer(io, heads) for io, heads in zip(kv_layers, query_heads(model, kv_layers))]
    kinds = {(f.num_kv_heads, f.head_dim) for f in layers}
    if len(kinds) > 1:
        raise GraphError(f"layers disagree on (kv_heads, head_dim): {sorted(kinds)}; one cache layout per model")
    return layers


# --- files -------------------------------------------------------------------------------------

def load_model_checked(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model after validating it and its external data; raise GraphError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise GraphError(f"{path}: no such ONNX file; check the path")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise GraphError(f"{path}: not a readable ONNX model (truncated or garbage: {_first_line(exc)}); "
                         "re-export or re-download it") from None
    if not proto.graph.node and not proto.graph.output:
        raise GraphError(f"{path}: the file parses but holds no graph (truncated or not ONNX); re-export it")
    check_external_data(proto, path.parent)
    return ir.load(path)


def check_external_data(proto: onnx.ModelProto, model_dir: Path) -> None:
    root = model_dir.resolve()
    for tensor in all_tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            _check_one_external(tensor, model_dir, root)


def _check_one_external(tensor: onnx.TensorProto, model_dir: Path, root: Path) -> None:
    try:
        info = ExternalDataInfo(tensor)
    except ValueError as exc:
        raise GraphError(f"tensor {tensor.name!r}: bad external data entry ({exc}); re-export the model") from None
    where = f"tensor {tensor.name!r} stores its data in {info.location!r}"
    location = Path(info.location)
    if not info.location or location.is_absolute() or info.location.startswith(("/", "\\")):
        raise GraphError(f"{where}: an absolute or empty path; external data must be a file beside the model: "
                         "re-save it with a relative location")
    _check_no_symlink(model_dir, location, where)
    resolved = (model_dir / location).resolve()
    if not resolved.is_relative_to(root):
        raise GraphError(f"{where}, which is outside the model directory {root}; "
                         "external data must stay beside the model: re-save it there")
    if not resolved.is_file():
        raise GraphError(f"{where}, which does not exist; copy the .data file beside the model")
    _check_length(tensor, info, resolved, where)


def _check_no_symlink(model_dir: Path, location: Path, where: str) -> None:
    current = model_dir
    for part in location.parts:
        current = current / part
        if current.is_symlink():
            raise GraphError(f"{where}, and {current} is a symbolic link; copy the real file beside the model")


def _check_length(tensor: onnx.TensorProto, info: ExternalDataInfo, path: Path, where: str) -> None:
    needed = math.ceil(math.prod(tensor.dims) * ir.DataType(tensor.data_type).itemsize)
    offset = info.offset or 0
    available = path.stat().st_size - offset
    declared = info.length if info.length is not None else available
    if declared < needed or available < needed:
        raise GraphError(f"{where}, which holds {max(0, min(declared, available))} bytes at offset {offset} "
                         f"but the tensor needs {needed}; the data file is truncated or stale: re-export the model")


def all_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of the model that may hold (external) data: initializers, sparse initializers and
    tensor attributes of the main graph, of every subgraph and of every local function."""
    yield from _all_tensors(proto.graph)
    for function in proto.functions:
        yield from _node_tensors(function.node)


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    yield from _node_tensors(graph.node)


def _node_tensors(nodes) -> Iterator[onnx.TensorProto]:
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sparse in ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(attr.sparse_tensors):
                yield sparse.values
                yield sparse.indices
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
