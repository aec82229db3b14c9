"""The sliding windows a graph's attention masks apply, read by evaluating the masks at sample lengths.

transformers before 4.5x (and hand-written exports) apply a model's window in the mask alone, with no cache
crop for kvc.passes.cache_crop to read: the mask hides keys more than W - 1 positions behind each query. For
each Softmax of the unfused graph (one per layer, in graph order), the mask parts of its input are found: the
operand of an Add, or the condition of a Where against a constant fill, that is computed from attention_mask,
position_ids, input_ids and the lengths alone (kvc.passes.length_uses.LengthShapes gives the shape reads).
They are evaluated with ONNX's reference evaluator for an all-ones attention_mask at sample lengths: past P up
to the model's positions with one new token (a decode row is all a window needs), and short prefills. A key
is visible where every part lets it through (0 added, the Where keeps the score). The visible keys of each
query at position q must be q - W + 1 .. q for one W (or 0 .. q: no window seen within the positions).

Masks that hide keys behind some queries but not the same way behind all of them (widths that no single W
explains: transformers 4.46's Gemma2 exported with a DynamicCache windows its prefills and not its decode steps)
are refused: compiling them as full attention, or with either width, would silently change what the graph
computes for some prompts. Anything else (a mask reading tensor data, values other than 0 and a large negative,
keys after the query, holes) gives no answer: the caller then relies on the other sources of the window and on
compile's check against the original graph.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from kvc.contract import ATTENTION_MASK, INPUT_IDS, PAST_RE, POSITION_IDS
from kvc.errors import GraphError
from kvc.passes._patterns import ProbeError, const_scalar, has_subgraph, run_slice
from kvc.passes.cache_crop import GraphWindows
from kvc.passes.length_uses import LengthShapes, derived_inputs

_MAX_PREFILL = 16  # new tokens in the prefill samples; decode samples reach the model's positions
_VISIBLE_MAX, _HIDDEN_MAX = 1e-6, -1e4  # an additive mask adds 0 (|x| <= this) or at most -1e4


class _NoAnswer(Exception):
    pass


class _Contradiction(Exception):
    """Two queries that no single window explains, each as (past, new, query, width) of its sample."""

    def __init__(self, first: tuple[int, int, int, int], second: tuple[int, int, int, int]):
        super().__init__(f"{_sample_text(*first)}, but {_sample_text(*second)}")


def graph_mask_windows(model: ir.Model, max_positions: int) -> GraphWindows | None:
    """The window each layer's mask applies, or None when the masks cannot be read that way."""
    if any(has_subgraph(n) for n in model.graph):
        return None  # optimum's merged If: its masks live in the branches (canonicalize selects one later)
    model = model.clone()  # tensors shared: cheap; shape inference gives the shape reads their dims
    ShapeInferencePass(data_prop=True)(model)
    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    layers = sum(1 for v in graph.inputs if PAST_RE.match(v.name or "") and v.name.endswith(".key"))
    softmaxes = [n for n in graph if n.op_type == "Softmax" and n.domain == ""]
    if INPUT_IDS not in inputs or not layers or len(softmaxes) != layers:
        return None
    probe = _MaskProbe(graph, inputs, max_positions)
    windows = []
    for layer, node in enumerate(softmaxes):
        try:
            windows.append(probe.window(_mask_parts(node.inputs[0], probe.computable)))
        except _NoAnswer:
            return None
        except _Contradiction as conflict:
            raise GraphError(f"the attention mask before Softmax {node.name!r} (layer {layer}) applies no single "
                             f"sliding window: {conflict}. kvc cannot carry such a mask into a ring cache (transformers "
                             f"4.46's Gemma2 exported with a DynamicCache does this: its window is measured from the "
                             f"first new token, not from position 0); export the graph with a transformers whose "
                             f"masks apply the model's window at every past length") from None
    return GraphWindows(windows[0]) if len(set(windows)) == 1 else GraphWindows(None, windows)


def _mask_parts(scores: ir.Value, computable: set[ir.Value]) -> list[tuple[ir.Value, str]]:
    """(value, how it masks) for each mask part on the way from the Softmax input back to the scores."""
    parts, value = [], scores
    while (node := value.producer()) is not None and node.domain == "":
        operands = list(node.inputs)
        if node.op_type == "Cast":
            value = operands[0]
        elif node.op_type == "Add" and len(operands) == 2 and (operands[0] in computable) != (operands[1] in computable):
            mask, value = operands if operands[0] in computable else operands[::-1]
            parts.append((mask, "add"))
        elif node.op_type == "Where" and operands[0] in computable and const_scalar(operands[2]) is not None:
            parts.append((operands[0], "keep"))
            value = operands[1]
        elif node.op_type == "Where" and operands[0] in computable and const_scalar(operands[1]) is not None:
            parts.append((operands[0], "drop"))
            value = operands[2]
        else:
            break
    if not parts:
        raise _NoAnswer
    return parts


class _MaskProbe:
    def __init__(self, graph: ir.Graph, inputs: dict[str, ir.Value], max_positions: int):
        self.graph, self.opsets = graph, dict(graph.opset_imports)
        self.ids, self.mask, self.positions = inputs.get(INPUT_IDS), inputs.get(ATTENTION_MASK), inputs.get(POSITION_IDS)
        self.shapes = LengthShapes(graph)
        self.computable = self._computable()
        top = max(max_positions, 2)
        self.samples = sorted({(0, 1), (0, min(5, top)), (0, min(_MAX_PREFILL, top)), (3, min(4, top - 3)),
                               *((p, 1) for p in (1, 2, 7, top // 4, top // 3, top // 2, top - 2, top - 1)),
                               (max(top - _MAX_PREFILL, 0), min(_MAX_PREFILL, top))})
        self.samples = [(p, s) for p, s in self.samples if p >= 0 and s >= 1 and p + s <= top]
        self._windows: dict[tuple, int | None] = {}  # layers usually share one mask

    def _computable(self) -> set[ir.Value]:
        """Values following from attention_mask, position_ids, the lengths and constants (input_ids' values
        are not among them: from those the whole network follows)."""
        fed = {v for v in (self.mask, self.positions) if v is not None}
        computable: set[ir.Value] = set(fed)
        self._shape_reads: dict[ir.Value, ir.Node] = {}  # fed with the dims their input has at a sample
        for node in self.graph:
            if node.op_type == "Shape" and node.domain == "" and node.inputs[0] not in computable \
                    and self.shapes.read(node, (1, 2, 3)) is not None:
                computable.update(node.outputs)
                self._shape_reads[node.outputs[0]] = node
                continue
            if derived_inputs(node, computable) is not None:  # Constant nodes too
                computable.update(node.outputs)
        return computable

    def _feeds(self, past: int, new: int) -> dict[ir.Value, np.ndarray]:
        feeds = {}
        if self.mask is not None:
            feeds[self.mask] = np.ones((1, past + new), self.mask.dtype.numpy())
        if self.positions is not None:
            feeds[self.positions] = np.arange(past, past + new, dtype=self.positions.dtype.numpy())[None]
        for value, node in self._shape_reads.items():
            feeds[value] = self.shapes.read(node, (1, past, new))
        return feeds

    def window(self, parts: list[tuple[ir.Value, str]]) -> int | None:
        """W, or None: every query sees every earlier key at every sample."""
        key = tuple((id(value), how) for value, how in parts)
        if key not in self._windows:
            self._windows[key] = self._fit(parts)
        return self._windows[key]

    def _fit(self, parts: list[tuple[ir.Value, str]]) -> int | None:
        widest_full, exact = None, None  # (past, new, query, width) of a query seeing every key / fewer keys
        for past, new in self.samples:
            visible = self._visible_keys(parts, past, new)
            for i in range(new):
                query = past + i
                row = visible[i]
                seen = np.flatnonzero(row)
                if row[query + 1:].any() or not seen.size or seen[-1] != query or seen.size != query - seen[0] + 1:
                    raise _NoAnswer  # not causal, or holes
                sample = (past, new, query, seen.size)
                if seen[0] == 0:
                    if widest_full is None or seen.size > widest_full[3]:
                        widest_full = sample
                elif exact is None:
                    exact = sample
                elif exact[3] != seen.size:
                    raise _Contradiction(exact, sample)
        if exact is not None and widest_full is not None and exact[3] < widest_full[3]:
            raise _Contradiction(exact, widest_full)
        return None if exact is None else exact[3]

    def _visible_keys(self, parts: list[tuple[ir.Value, str]], past: int, new: int) -> np.ndarray:
        """[new, past + new] bool: which keys each new token's query sees."""
        feeds = self._feeds(past, new)
        try:
            arrays = run_slice([value for value, _ in parts], feeds, self.opsets)
        except ProbeError:
            raise _NoAnswer from None
        visible = np.ones((new, past + new), bool)
        for (_, how), array in zip(parts, arrays):
            if how == "add":
                array = array.astype(np.float64)
                if not np.all((np.abs(array) <= _VISIBLE_MAX) | (array <= _HIDDEN_MAX)):
                    raise _NoAnswer  # a bias (ALiBi, ...), not a mask
                lets = np.abs(array) <= _VISIBLE_MAX
            else:
                lets = array.astype(bool) if how == "keep" else ~array.astype(bool)
            try:
                lets = np.broadcast_to(lets, lets.shape[:-2] + (new, past + new))
            except ValueError:
                raise _NoAnswer from None
            rows = lets.reshape(-1, new, past + new)
            if not all(np.array_equal(rows[0], r) for r in rows[1:]):
                raise _NoAnswer  # differs between rows or heads with no padding: not a plain window
            visible &= rows[0]
        return visible


def _sample_text(past: int, new: int, query: int, width: int) -> str:
    step = (f"a decode step after {past} tokens" if new == 1 else f"a {new}-token prefill" if not past
            else f"a {new}-token prefill after {past} cached tokens")
    return f"in {step} the query at position {query} sees the last {width} keys" + (
        "" if width <= query else " (all of them)")
