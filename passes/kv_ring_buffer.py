"""KV ring-buffer rewrite: concat-form past/present caches -> fixed-capacity in-place rings.

Input: a decoder whose attention is fused, per layer, into
  Attention(Q_BHSD, K_BKSD, V_BKSD, attn_mask, past_key_BKPD, past_value_BKPD) -> (Y, present_key, present_value)
with the mask computed in-graph from ``attention_mask`` [B, P+S].
Output (the contract in kvc.passes.kv_layout), per layer:
  present_key_BKCD = TensorScatter(past_key_BKCD, K_BKSD, past_len mod C, mode="circular", axis=2)
  Y = Attention(Q_BHSD, present_key_BKCD, present_value_BKCD, ring_mask_B1SC, nonpad_kv_seqlen=min(past_len+S, C))
The ring mask, the write index and nonpad_kv_seqlen are built once from ``past_len`` and shared by
all layers (one mask per distinct window where the layers' windows differ, e.g. Gemma2's alternating
sliding and full layers); the old ``attention_mask`` input and its mask subgraph are removed as dead code.

Legend: B batch, H query heads, K kv heads, S new tokens, P past tokens, C capacity, D head size.
"""
from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from kvc.contract import ATTENTION_MASK, BATCH_DIM, LAYOUT_KEY, PAST_LEN, POSITION_IDS
from kvc.errors import GraphError
from kvc.passes.base import KvcPass, PassReport
from kvc.passes.graph_checks import FusedLayer, check_ring_input
from kvc.passes.kv_layout import KvCacheLayout, RingBufferOptions

RING_OPSET = 24  # TensorScatter and Attention's nonpad_kv_seqlen
DROPPED_ATTENTION_ATTRS = ("is_causal",)  # causality now lives in the ring mask
RING_INITIALIZER_PREFIX = "kvc_ring."
# The two constants that carry the capacity C; engine lowering may replace them (lower_ort_live_slots).
CAPACITY_INITIALIZER = RING_INITIALIZER_PREFIX + "capacity"  # scalar int64 C
SLOTS_INITIALIZER = RING_INITIALIZER_PREFIX + "slots"  # arange(C) int64

__all__ = ["KvRingBufferPass", "RingBufferOptions"]


@dataclass(frozen=True)
class RingSignals:
    """Per-step values every layer shares."""

    write_index_B: ir.Value  # past_len mod C
    kv_len_B: ir.Value  # min(past_len + S, C) -> nonpad_kv_seqlen
    masks_B1SC: dict  # window (None: none narrower than C) -> additive (or boolean) visibility of each slot


class KvRingBufferPass(KvcPass):
    name = "kv_ring_buffer"
    changes_io = True

    def __init__(self, options: RingBufferOptions):
        super().__init__()
        self.options = options

    def apply(self, model: ir.Model) -> PassReport:
        options = self.options
        capacity, window = options.capacity, options.sliding_window
        layers = _preconditions(model, options)  # the graph is untouched until here
        _rewrite(model, layers, options)
        KvCacheLayout(num_layers=len(layers), num_kv_heads=layers[0].num_kv_heads, head_dim=layers[0].head_dim,
                      capacity=capacity, sliding_window=window, layer_windows=options.layer_windows).write_to(model)
        report = PassReport(self.name, matched=len(layers))
        windows = f"per-layer windows {list(options.layer_windows)}" if options.layer_windows else \
            f"sliding window {window}"
        report.notes.append(f"capacity {capacity}; {windows}")
        if options.layer_windows and None in options.layer_windows:
            report.notes.append(f"wrap-around past {capacity} tokens narrows the full-attention layers to the last "
                                f"{capacity} tokens: exact only within the capacity")
        elif window is None or window > capacity:
            report.notes.append(f"wrap-around past {capacity} tokens is sliding-window attention of width "
                                f"{capacity}: exact only for models trained with such a window")
        return report


def _rewrite(model: ir.Model, layers: list[FusedLayer], options: RingBufferOptions) -> None:
    _upgrade_opset(model)
    past_len = _add_past_len_input(model.graph, layers[0].io.past_key.shape[0])
    capacity = options.capacity
    windows = [_binding_window(options.window_of(layer.io.layer), capacity) for layer in layers]
    signals = _build_ring_signals(model.graph, layers, past_len, capacity, sorted(set(windows), key=_window_order))
    for layer, window in zip(layers, windows):
        _rewrite_layer(model.graph, layer, signals, capacity, window)
    common_passes.RemoveUnusedNodesPass()(model)  # the concat-form mask subgraph
    _drop_attention_mask_input(model.graph)
    model.graph.sort()


# --- preconditions ----------------------------------------------------------------------------

def _binding_window(window: int | None, capacity: int) -> int | None:
    """The window the mask must apply: wider ones are implied by the capacity."""
    return window if window is not None and window < capacity else None


def _window_order(window: int | None) -> float:
    return float("inf") if window is None else window


def _preconditions(model: ir.Model, options: RingBufferOptions) -> list[FusedLayer]:
    """Everything that can refuse the graph, checked before anything is changed."""
    if LAYOUT_KEY in model.metadata_props:
        raise GraphError(f"this graph already has a ring-buffer KV cache ({LAYOUT_KEY} metadata); "
                         "run the ring-buffer pass once, on the concat-form graph")
    layers = check_ring_input(model)
    if options.layer_windows and len(options.layer_windows) != len(layers):
        raise GraphError(f"{len(options.layer_windows)} per-layer windows were given for a graph of {len(layers)} "
                         "layers; pass the config.json of this model")
    _check_crops_match_window(layers, options)
    _check_attention_mask_only_feeds_masks(model.graph, layers)
    return layers


def _check_crops_match_window(layers: list[FusedLayer], options: RingBufferOptions) -> None:
    """A graph that crops its caches applies a window: the ring must apply the same one, or the crop
    (which the rewrite drops) would silently become full attention. A crop at least as wide as the ring never
    binds."""
    capacity = options.capacity
    for layer in layers:
        window = options.window_of(layer.io.layer)
        crop = layer.crop_window
        if crop is None or crop == window or (window is None and crop >= capacity):
            continue
        said = "no sliding window" if window is None else f"sliding window {window}"
        raise GraphError(f"layer {layer.io.layer}: the graph keeps the last {crop - 1} cached positions (Slice "
                         f"{layer.crops[0].name!r}), a sliding window of {crop}, but the ring was asked for {said} "
                         f"with {capacity} slots; compile with --sliding-window {crop} (kvc compile reads it from "
                         "the graph)")


def _check_attention_mask_only_feeds_masks(graph: ir.Graph, layers: list[FusedLayer]) -> None:
    """attention_mask must become dead once the Attention masks are replaced; else refuse now."""
    mask_input = _graph_input(graph, ATTENTION_MASK)
    if mask_input is None:
        return
    cut = {id(f.attention) for f in layers}
    reader_of: dict[int, ir.Node] = {}  # node -> a node that reads its output on the way to a graph output
    stack = [(v.producer(), None) for v in graph.outputs if v.producer() is not None]
    while stack:
        node, reader = stack.pop()
        if id(node) in reader_of:
            continue
        reader_of[id(node)] = reader
        inputs = node.inputs[:3] if id(node) in cut else node.inputs  # skip the old mask and pasts
        for value in inputs:
            if value is mask_input:
                raise GraphError(f"{ATTENTION_MASK} is used by {node.op_type} node {node.name!r} besides the "
                                 f"attention mask{_first_data_use(node, reader_of)}; the ring graph has no "
                                 "attention_mask input: export with position_ids as an input and without sizes "
                                 "computed from it (kvc export does)")
            if value is not None and value.producer() is not None:
                stack.append((value.producer(), node))


def _first_data_use(node: ir.Node, reader_of: dict[int, ir.Node]) -> str:
    """', reaching <op> node <name>': the first node on the way to an output that computes on tensor data
    rather than on integer sizes (what the user would look for in the graph)."""
    while node is not None:
        if any(v.dtype not in (ir.DataType.INT64, ir.DataType.INT32, None) for v in node.outputs):
            return f", reaching {node.op_type} node {node.name!r}"
        node = reader_of.get(id(node))
    return ""


def _graph_input(graph: ir.Graph, name: str) -> ir.Value | None:
    return next((v for v in graph.inputs if v.name == name), None)


def _upgrade_opset(model: ir.Model) -> None:
    if model.opset_imports.get("", 0) < RING_OPSET:
        from onnxscript.version_converter import convert_version

        convert_version(model, RING_OPSET)
    model.graph.opset_imports[""] = max(model.graph.opset_imports.get("", 0), RING_OPSET)
    model.ir_version = max(model.ir_version, 10)


# --- graph construction ---------------------------------------------------------------------

def _add_past_len_input(graph: ir.Graph, batch_dim) -> ir.Value:
    past_len = ir.val(PAST_LEN, ir.DataType.INT64, [batch_dim if batch_dim is not None else BATCH_DIM])
    names = [v.name for v in graph.inputs]
    at = names.index(POSITION_IDS) + 1 if POSITION_IDS in names else len(names)
    graph.inputs.insert(at, past_len)
    return past_len


def _build_ring_signals(graph: ir.Graph, layers: list[FusedLayer], past_len_B: ir.Value, capacity: int,
                        windows: list[int | None]) -> RingSignals:
    """``windows``: the distinct binding windows (None: none narrower than the capacity), one mask each."""
    tape = ir.tape.Tape(graph)
    const = _constant_maker(tape)
    C = const("capacity", np.array(capacity, np.int64))
    seq_1 = tape.op("Shape", [layers[0].attention.inputs[1]], {"start": 2, "end": 3})  # S from the new keys
    write_index_B = tape.op("Mod", [past_len_B, C])
    kv_len_B = tape.op("Min", [tape.op("Add", [past_len_B, seq_1]), C])
    causal_BSC, distance_BSC = _slot_visibility(tape, const, past_len_B, seq_1, capacity)
    axis1 = const("axis1", np.array([1], np.int64))
    masks = {}
    for window in windows:
        visible_BSC = causal_BSC
        if window is not None:
            inside = tape.op("Less", [distance_BSC, const(f"window_{window}", np.array(window, np.int64))])
            visible_BSC = tape.op("And", [causal_BSC, inside])
        masks[window] = tape.op("Unsqueeze", [_mask_values(tape, const, visible_BSC, _mask_dtype(layers[0])), axis1])
    return RingSignals(write_index_B, kv_len_B, masks)


def _slot_visibility(tape: ir.tape.Tape, const, past_len_B: ir.Value, seq_1: ir.Value,
                     capacity: int) -> tuple[ir.Value, ir.Value]:
    """([B, S, C] bool: query i (storage index past_len+i) may see slot c without a window (see kv_layout's
    docstring); [B, S, C] int64: how many positions back slot c lies from query i)."""
    C = const("capacity", np.array(capacity, np.int64))
    one, zero = const("one", np.array(1, np.int64)), const("zero", np.array(0, np.int64))
    axis0, axis2 = const("axis0", np.array([0], np.int64)), const("axis2", np.array([2], np.int64))
    axis1 = const("axis1", np.array([1], np.int64))
    # Slot c holds storage index t(c) = the latest t < past_len+S with t mod C == c (negative: never written).
    last_B1 = tape.op("Sub", [tape.op("Unsqueeze", [tape.op("Add", [past_len_B, seq_1]), axis1]), one])
    slots_C = const("slots", np.arange(capacity, dtype=np.int64))
    held_BC = tape.op("Sub", [last_B1, tape.op("Mod", [tape.op("Sub", [last_B1, slots_C]), C])])
    steps_S = tape.op("Range", [zero, tape.op("Squeeze", [seq_1, axis0]), one])
    query_BS = tape.op("Add", [tape.op("Unsqueeze", [past_len_B, axis1]), steps_S])

    held_B1C = tape.op("Unsqueeze", [held_BC, axis1])
    distance_BSC = tape.op("Sub", [tape.op("Unsqueeze", [query_BS, axis2]), held_B1C])
    visible_BSC = tape.op("And", [tape.op("GreaterOrEqual", [held_B1C, zero]),
                                  tape.op("GreaterOrEqual", [distance_BSC, zero])])
    return visible_BSC, distance_BSC


def _constant_maker(tape: ir.tape.Tape):
    """Named initializers, created once per name."""
    made: dict[str, ir.Value] = {}

    def const(name: str, array: np.ndarray) -> ir.Value:
        if name not in made:
            made[name] = tape.initializer(ir.tensor(array, name=RING_INITIALIZER_PREFIX + name))
        return made[name]
    return const


def _mask_dtype(layer: FusedLayer) -> ir.DataType:
    """Keep the original mask's kind (bool or additive float); float masks use the cache's dtype."""
    old_mask = layer.attention.inputs[3] if len(layer.attention.inputs) > 3 else None
    if old_mask is not None and old_mask.dtype == ir.DataType.BOOL:
        return ir.DataType.BOOL
    return layer.io.past_key.dtype or ir.DataType.FLOAT


def _mask_values(tape: ir.tape.Tape, const, visible: ir.Value, dtype: ir.DataType) -> ir.Value:
    if dtype == ir.DataType.BOOL:
        return visible
    np_dtype = ml_dtypes.bfloat16 if dtype == ir.DataType.BFLOAT16 else dtype.numpy()
    # Lowest finite value rather than -inf: a fully masked row then stays finite (as in kvc's torch mask).
    lowest = const(f"mask_lowest_{dtype.name.lower()}", np.array(ml_dtypes.finfo(np_dtype).min, np_dtype))
    zero = const(f"mask_zero_{dtype.name.lower()}", np.array(0, np_dtype))
    return tape.op("Where", [visible, zero, lowest])


def _rewrite_layer(graph: ir.Graph, layer: FusedLayer, signals: RingSignals, capacity: int,
                   window: int | None) -> None:
    old = layer.attention
    caches = [_scatter_into_ring(graph, layer, past, new_kv, signals, capacity)
              for past, new_kv in ((layer.io.past_key, old.inputs[1]), (layer.io.past_value, old.inputs[2]))]
    new = ir.Node("", "Attention", [old.inputs[0], caches[0], caches[1], signals.masks_B1SC[window], None, None,
                                    signals.kv_len_B],
                  attributes=[a for name, a in old.attributes.items() if name not in DROPPED_ATTENTION_ATTRS],
                  num_outputs=1, name=f"{old.name or 'attention'}_ring")
    graph.append(new)
    y = old.outputs[0]
    _copy_type(new.outputs[0], y)
    y.replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)

    presents = (layer.io.present_key, layer.io.present_value)
    for updated, present in zip(caches, presents):
        graph.outputs[list(graph.outputs).index(present)] = updated
    y_name = y.name
    for crop in layer.crops:  # the ring mask applies their window; the present-side ones feed nothing now
        crop.outputs[0].replace_all_uses_with(crop.inputs[0])
    graph.remove(list(layer.crops), safe=True)
    graph.remove(old, safe=True)
    new.outputs[0].name = y_name
    for updated, present in zip(caches, presents):
        name, present.name = present.name, None
        updated.name = name


def _scatter_into_ring(graph: ir.Graph, layer: FusedLayer, past: ir.Value, new_kv: ir.Value, signals: RingSignals,
                       capacity: int) -> ir.Value:
    """past becomes a [B, K, C, D] ring; returns TensorScatter's updated ring (the new present output)."""
    past.shape = ir.Shape([past.shape[0], layer.num_kv_heads, capacity, layer.head_dim])
    updated = ir.tape.Tape(graph).op("TensorScatter", [past, new_kv, signals.write_index_B],
                                     {"mode": "circular", "axis": 2})
    _copy_type(updated, past)
    return updated


def _copy_type(target: ir.Value, source: ir.Value) -> None:
    """Shape and dtype, without sharing the type object (the quantize pass retypes caches one by one)."""
    target.shape = source.shape
    if source.dtype is not None:
        target.type = ir.TensorType(source.dtype)


def _drop_attention_mask_input(graph: ir.Graph) -> None:
    mask_input = _graph_input(graph, ATTENTION_MASK)
    if mask_input is None:
        return
    if mask_input.uses():  # unreachable after the precondition check; guard all the same
        users = sorted({n.op_type for n, _ in mask_input.uses()})
        raise GraphError(f"{ATTENTION_MASK} is still used by {users} after the rewrite; report this graph")
    graph.inputs.remove(mask_input)
