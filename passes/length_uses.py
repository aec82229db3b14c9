"""Numbers a graph computes from the sequence lengths -> the same numbers from inputs the ring graph has.

Exporters compute sizes and positions from the past length, read off ``attention_mask``'s or a past
cache's shape. The ring graph has neither (its caches have a fixed capacity and its ``past_len`` is a
per-row storage index), so outside the attention masks, which the ring pass replaces, such a read blocks
the ring rewrite. Two forms occur:
  * sizes: the dynamo exporter writes its symbolic sizes as arithmetic on the lengths. GPT-2 in
    transformers 4.5x slices its causal bias by the past length, so the exporter sizes the next layer's
    rows as ``Max(0, Min(L, P + S) - Min(L, P))`` (S while P + S <= L, the model's positions) and builds
    that layer's Reshape targets from it;
  * positions: a graph without a ``position_ids`` input (optimum's Gemma) computes them as
    ``Range(P, P + S)`` in a [1, S] row.

Every value computed only from those shapes and constants, read by a node that is not, is evaluated on
sample lengths: batch B in {1, 3}, past P and new tokens S with P + S within the model's positions, the
edges P = 0, S = 1 and P + S = L included. A value whose every element equals B, S or one constant at every
sample is rebuilt from ``input_ids``' shape. A value of the [1, S] row form (or one it is cast or
unsqueezed into) that equals P..P+S-1 at every sample becomes ``position_ids`` (added as an input when the
graph has none): that is the row every batch row shares in the concat graph, and each row's own positions
in the ring graph. These are checks on samples, not proofs; ``kvc compile`` then runs the original graph
and the compiled one side by side and refuses on mismatch. Values matching neither are left as they are;
if they survive into the ring graph, the ring pass names the node that reads them.
"""
from __future__ import annotations

from collections.abc import Collection

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from kvc.contract import ATTENTION_MASK, INPUT_IDS, PAST_RE, POSITION_IDS
from kvc.passes._patterns import ProbeError, SampleDims, attr_int, const_array, has_subgraph, run_slice, static_dim
from kvc.passes.base import KvcPass, PassReport

__all__ = ["LengthUsesFromInputsPass", "PositionsFromInputsPass"]

_DEFAULT_POSITIONS = 64  # sample range when the model's max positions are unknown
_INTEGER_TYPES = {ir.DataType.INT64, ir.DataType.INT32}
_BATCH, _NEW = "batch", "new"  # element sources besides constants
_PASS_THROUGH = ("Cast", "Unsqueeze", "Identity")  # between a positions row and the value read


class _LengthUsesPass(KvcPass):
    """Shared set-up: the length values, the samples, and the reads to look at."""

    def __init__(self, max_positions: int | None = None):
        super().__init__()
        self.max_positions = max_positions

    def apply(self, model: ir.Model) -> PassReport:
        report = PassReport(self.name)
        graph = model.graph
        roots = LengthShapes(graph)
        ids = roots.ids
        if ids is None or not roots.holds_past_length:
            return report
        lengths = _length_values(graph, roots)
        samples = [_sample_feeds(graph, roots, lengths, sizes)
                   for sizes in _samples(self.max_positions or _DEFAULT_POSITIONS)]
        opsets = dict(graph.opset_imports)
        replacements = [self.replace(graph, value, ids, lengths, samples, opsets) for value in _reads(graph, lengths)]
        replacements = [new for new in replacements if new is not None]
        report.matched = len(replacements)
        if replacements:
            graph.sort()
            _forget_length_expressions(model, replacements)
        return report

    def replace(self, graph, value, ids, lengths, samples, opsets) -> ir.Value | None:
        """The value now read instead of ``value``, or None when it is left."""
        raise NotImplementedError


class PositionsFromInputsPass(_LengthUsesPass):
    """Position rows computed from the past length -> ``position_ids``. Runs before the RoPE fusion, which
    then reads its cos/sin tables by position_ids."""

    name = "positions"
    changes_io = True  # adds position_ids when the graph has none

    def replace(self, graph, value, ids, lengths, samples, opsets) -> ir.Value | None:
        row = _positions_row(value, lengths, samples, opsets)
        if row is None:
            return None
        positions = _position_ids(graph, ids)
        ir.convenience.replace_all_uses_with(row, positions)
        return positions


class LengthUsesFromInputsPass(_LengthUsesPass):
    """Sizes computed from the past length -> sizes from ``input_ids``' shape. Runs after the attention fusion
    (whose head-repeat probes rely on the pasts' own shape reads) and past_shapes."""

    name = "length_uses"

    def replace(self, graph, value, ids, lengths, samples, opsets) -> ir.Value | None:
        found = _element_sources(value, samples, opsets)
        return None if found is None else _rebuild(graph, value, ids, *found)


class LengthShapes:
    """Shape reads whose values follow from the lengths: of input_ids [B, S], attention_mask [B, P + S], the
    pasts [B, K, P, D], and of any value whose read dims are integers or the symbols those inputs name (an
    embedding's [batch, seq, hidden]). Gives each such read's value for sample lengths."""

    _MEANINGS = {INPUT_IDS: ("B", "S"), ATTENTION_MASK: ("B", "T")}

    def __init__(self, graph: ir.Graph):
        inputs = {v.name: v for v in graph.inputs}
        self.ids = inputs.get(INPUT_IDS)
        self._inputs: dict[ir.Value, tuple] = {}
        for name, meaning in self._MEANINGS.items():
            if name in inputs:
                self._inputs[inputs[name]] = meaning
        for value in graph.inputs:
            # A past with symbolic heads or head size is left out: a sample would make those look constant.
            if PAST_RE.match(value.name or "") and static_dim(value, 1) and static_dim(value, 3):
                self._inputs[value] = ("B", static_dim(value, 1), "P", static_dim(value, 3))
        self._symbols = self._symbol_meanings()

    @property
    def holds_past_length(self) -> bool:
        return any("P" in m or "T" in m for m in self._inputs.values())

    def _symbol_meanings(self) -> dict[str, str]:
        seen: dict[str, set] = {}
        for value, meaning in self._inputs.items():
            for dim, what in zip(value.shape or (), meaning):
                if isinstance(dim, ir.SymbolicDim) and dim.value and str(dim.value).isidentifier():
                    seen.setdefault(dim.value, set()).add(what)
        return {name: what.pop() for name, what in seen.items() if len(what) == 1}

    def read(self, node: ir.Node, lengths: tuple[int, int, int]) -> np.ndarray | None:
        """Shape(x, start, end) at sample lengths (batch, past, new); None if x's dims do not follow from them."""
        source = node.inputs[0]
        if source is None or source.shape is None:
            return None
        batch, past, new = lengths
        sizes = {"B": batch, "P": past, "S": new, "T": past + new}
        if source in self._inputs:
            dims = [sizes[m] if isinstance(m, str) else m for m in self._inputs[source]]
        else:
            named = SampleDims(sizes=(), named={name: sizes[what] for name, what in self._symbols.items()})
            try:
                dims = [named.size(d) for d in source.shape]
            except ProbeError:
                return None
        rank = len(dims)
        start, end = attr_int(node, "start", 0), attr_int(node, "end", rank)
        return np.array(dims[slice(start, end)], np.int64)


def _length_values(graph: ir.Graph, roots: LengthShapes) -> dict[ir.Value, bool]:
    """Values computed only from length-bearing shape reads and constants -> whether they depend on the past
    length."""
    lengths: dict[ir.Value, bool] = {}
    for node in graph:
        if node.op_type == "Shape" and node.domain == "":
            short, long = roots.read(node, (2, 3, 5)), roots.read(node, (2, 11, 5))
            if short is not None:
                lengths[node.outputs[0]] = not np.array_equal(short, long)
            continue
        read = derived_inputs(node, lengths)
        if read:  # a node reading constants only is not length arithmetic
            for out in node.outputs:
                lengths[out] = any(lengths[i] for i in read)
    return lengths


def derived_inputs(node: ir.Node, known: Collection[ir.Value]) -> list[ir.Value] | None:
    """The non-constant inputs of a plain ONNX node (no control flow) when all of them are ``known`` values,
    so its outputs follow from those (and constants); else None."""
    if node.domain != "" or has_subgraph(node):
        return None
    read = [i for i in node.inputs if i is not None and const_array(i) is None]
    return read if all(i in known for i in read) else None


def _sample_feeds(graph: ir.Graph, roots: LengthShapes, lengths: dict[ir.Value, bool], sizes: tuple[int, int, int]):
    """((batch, past, new), {each length-bearing Shape read: its value at those lengths})."""
    feeds = {}
    for value in lengths:
        node = value.producer()
        if node is not None and node.op_type == "Shape" and node.domain == "":
            feeds[value] = roots.read(node, sizes)
    return sizes, feeds


def _reads(graph: ir.Graph, lengths: dict[ir.Value, bool]) -> list[ir.Value]:
    """Values depending on the past length that a node outside the length arithmetic reads."""
    reads: dict[ir.Value, None] = {}
    for node in graph:
        if node.outputs and node.outputs[0] in lengths:
            continue
        for value in node.inputs:
            if value is not None and lengths.get(value) and not value.is_graph_output():
                reads[value] = None
    return list(reads)


def _samples(max_positions: int) -> list[tuple[int, int, int]]:
    """(batch, past, new) lengths with past + new <= max_positions."""
    top = max(max_positions, 2)
    pairs = {(0, 1), (1, 1), (0, min(5, top)), (top - 1, 1), (max(top - 5, 0), min(5, top)), (top // 3, top // 2),
             (0, top), (min(7, top - 1), 1)}
    return [(batch, past, new) for batch in (1, 3) for past, new in sorted(pairs) if past + new <= top and new >= 1]


def _evaluate(value: ir.Value, samples, opsets) -> list[np.ndarray] | None:
    try:
        return [run_slice([value], feeds, opsets)[0] for _, feeds in samples]
    except ProbeError:
        return None


def _element_sources(value: ir.Value, samples, opsets) -> tuple[list, int] | None:
    """Per element of an integer ``value`` (a scalar or 1-D): _BATCH, _NEW or the constant it holds at every
    sample; with the value's rank. None when an element is none of these or the value's size varies."""
    if value.dtype not in _INTEGER_TYPES:
        return None
    results = _evaluate(value, samples, opsets)
    if results is None or any(r.ndim > 1 or r.size != results[0].size or r.ndim != results[0].ndim for r in results):
        return None
    sources = [{_BATCH, _NEW, int(x)} for x in results[0].reshape(-1)]
    for ((batch, _, new), _), got in zip(samples, results):
        for kept, x in zip(sources, got.reshape(-1).tolist()):
            kept &= ({_BATCH} if x == batch else set()) | ({_NEW} if x == new else set()) | {x}
    if any(len(kept) != 1 for kept in sources):
        return None
    return [kept.pop() for kept in sources], results[0].ndim


def _positions_row(value: ir.Value, lengths: dict[ir.Value, bool], samples, opsets) -> ir.Value | None:
    """``value`` or what it was cast or unsqueezed from, when that is the [1, S] row P..P+S-1 at every sample."""
    while value is not None and value in lengths:
        if value.dtype in _INTEGER_TYPES and value.shape is not None and value.shape.rank() == 2:
            results = _evaluate(value, samples, opsets)
            if results is not None and all(got.shape == (1, new) and np.array_equal(got[0], np.arange(past, past + new))
                                           for ((_, past, new), _), got in zip(samples, results)):
                return value
        node = value.producer()
        if node is None or node.op_type not in _PASS_THROUGH or node.domain != "":
            return None
        value = node.inputs[0]
    return None


def _position_ids(graph: ir.Graph, ids: ir.Value) -> ir.Value:
    existing = next((v for v in graph.inputs if v.name == POSITION_IDS), None)
    if existing is not None:
        return existing
    positions = ir.val(POSITION_IDS, ir.DataType.INT64, ids.shape)
    graph.inputs.insert(list(graph.inputs).index(ids) + 1, positions)
    return positions


def _rebuild(graph: ir.Graph, value: ir.Value, ids: ir.Value, sources: list, rank: int) -> ir.Value:
    tape = ir.tape.Tape(graph)
    pieces = []
    for i, source in enumerate(sources):
        if source in (_BATCH, _NEW):
            dim = 0 if source == _BATCH else 1
            pieces.append(tape.op("Shape", [ids], {"start": dim, "end": dim + 1}))
        else:
            pieces.append(tape.initializer(ir.tensor(np.array([source], np.int64), name=f"{value.name}.kvc_length{i}")))
    new = pieces[0] if len(pieces) == 1 else tape.op("Concat", pieces, {"axis": 0})
    if rank == 0:
        new = tape.op("Squeeze", [new])
    if value.dtype != ir.DataType.INT64:
        new = tape.op("Cast", [new], {"to": value.dtype})
    ir.convenience.replace_all_uses_with(value, new)
    return new


def _forget_length_expressions(model: ir.Model, replaced: list[ir.Value]) -> None:
    """Shapes the exporter wrote as arithmetic on the lengths (``Max(0, Min(64, s62 + s70) - Min(64, s62))``)
    downstream of the values just replaced are forgotten; shape inference derives them again from the new
    reads (the manifest records the outputs' shapes, with symbol names only)."""
    stack = [node for value in replaced for node, _ in value.uses()]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for value in node.outputs:
            if value.shape is not None and any(_is_expression(d) for d in value.shape):
                value.shape = None
            stack.extend(user for user, _ in value.uses())
    ShapeInferencePass(data_prop=True)(model)


def _is_expression(dim) -> bool:
    return isinstance(dim, ir.SymbolicDim) and dim.value is not None and not str(dim.value).isidentifier()
