"""Sliding-window cache crops: the form Hugging Face's sliding-window cache takes in an exported graph.

transformers' DynamicSlidingWindowLayer keeps the last ``window - 1`` positions of each cache, and
torch.onnx.export (both exporters) writes that as ``Slice(cache, starts=[-(window-1)], ends=[huge],
axes=[2])`` on every past input (before the attention reads it) and on every present output. The
attention mask of such a graph lets each query see ``window`` positions (its own included), so the
crop and the mask say the same window; ``kvc compile`` checks the compiled graph against the original
past the window, so a graph that meant something else is refused there, not compiled silently wrong.

Read-only helpers: ``kept_tail`` recognises one crop, ``graph_crop_windows`` the windows a whole graph
applies (one for all layers, or one per layer: Gemma2's alternating sliding and full layers).
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from kvc.contract import PAST_RE
from kvc.errors import GraphError
from kvc.passes._patterns import const_ints

SEQ_AXES = (2, -2)  # [batch, kv_heads, seq, head_dim]
_TO_THE_END = 2 ** 31 - 1  # any end at least this large slices to the end of the axis

__all__ = ["GraphWindows", "kept_tail", "crop_of", "graph_crop_windows"]


def kept_tail(node: ir.Node) -> int | None:
    """K when ``node`` is a Slice keeping the last K positions of a cache's sequence axis, else None."""
    if node.op_type != "Slice" or node.domain != "" or len(node.inputs) < 4:
        return None
    starts, ends, axes = (const_ints(node.inputs[i]) for i in (1, 2, 3))
    steps = const_ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else [1]
    if None in (starts, ends, axes, steps) or not len(starts) == len(ends) == len(axes) == len(steps) == 1:
        return None
    if axes[0] not in SEQ_AXES or steps[0] != 1 or starts[0] >= 0 or ends[0] < _TO_THE_END:
        return None
    return -starts[0]


def crop_of(value: ir.Value) -> tuple[ir.Node, int] | None:
    """(the Slice, K) when ``value``'s only consumer is a crop keeping its last K positions."""
    uses = list(value.uses())
    if len(uses) != 1 or uses[0][1] != 0:
        return None
    keep = kept_tail(uses[0][0])
    return None if keep is None else (uses[0][0], keep)


@dataclass(frozen=True)
class GraphWindows:
    """The sliding windows a graph's cache crops apply."""

    window: int | None  # the one window of every layer (None: none, or per layer)
    layer_windows: tuple[int | None, ...] = ()  # per layer when the layers differ (None: full attention)


def graph_crop_windows(model: ir.Model) -> GraphWindows:
    """The windows the graph's cache crops apply (K + 1). An unoptimized export may compute the Slice bounds
    (the dynamo exporter): then they are folded on a copy of the graph."""
    keeps = _kept_tails(model)
    if not any(k is not None for k in keeps.values()) and _reaches_slice(model):
        import onnxscript.optimizer

        folded = model.clone()  # tensors shared: cheap
        onnxscript.optimizer.fold_constants(folded)
        keeps = _kept_tails(folded)
    per_layer: dict[int, set] = {}
    for name, keep in keeps.items():
        per_layer.setdefault(int(PAST_RE.match(name).group(1)), set()).add(None if keep is None else keep + 1)
    mixed = sorted(layer for layer, windows in per_layer.items() if len(windows) > 1)
    if mixed:
        raise GraphError(f"layer {mixed[0]}: its key and value caches are cropped to different lengths; kvc cannot "
                         "tell the layer's window, so this graph cannot be compiled")
    windows = tuple(per_layer[layer].pop() for layer in sorted(per_layer))
    if len(set(windows)) == 1:
        return GraphWindows(windows[0] if windows else None)
    return GraphWindows(None, windows)


def _pasts(model: ir.Model) -> list[ir.Value]:
    return [v for v in model.graph.inputs if PAST_RE.match(v.name or "")]


def _kept_tails(model: ir.Model) -> dict[str, int | None]:
    """Per past input: K of the crop it goes through, or None."""
    keeps: dict[str, int | None] = {}
    for past in _pasts(model):
        found = [kept_tail(node) for node, index in _uses_through_copies(past) if index == 0]
        keeps[past.name] = next((k for k in found if k is not None), None)
    return keeps


def _reaches_slice(model: ir.Model) -> bool:
    return any(node.op_type == "Slice" for past in _pasts(model) for node, _ in _uses_through_copies(past))


def _uses_through_copies(value: ir.Value) -> list[tuple[ir.Node, int]]:
    """Uses of ``value`` and of its unchanged copies (Identity, one-input Concat, a Slice of everything) in an
    unoptimized export."""
    uses, frontier = [], [value]
    while frontier:
        for node, index in frontier.pop().uses():
            if node.op_type == "Identity" or (node.op_type == "Concat" and len(node.inputs) == 1) \
                    or (index == 0 and _slices_everything(node)):
                frontier.extend(node.outputs)
            else:
                uses.append((node, index))
    return uses


def _slices_everything(node: ir.Node) -> bool:
    if node.op_type != "Slice" or len(node.inputs) < 3:
        return False
    starts, ends = const_ints(node.inputs[1]), const_ints(node.inputs[2])
    steps = const_ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else [1]
    return None not in (starts, ends, steps) and all(s == 0 for s in starts) \
        and all(e >= _TO_THE_END for e in ends) and all(s == 1 for s in steps)
