"""Helpers shared by the fusion passes.

* constants: read scalars and int lists off values (initializers or Constant nodes);
* probes: run a small slice of the graph with onnx's ReferenceEvaluator on sample data, to learn
  what a chain of data-movement ops computes when its structure alone does not say (shape
  arithmetic fed by Shape nodes, torch's ``expand(-1)`` tricks, cos/sin tables computed in-graph);
* notes: why a rule did not match a candidate, from the rewriter's MatchingTracer.
"""
from __future__ import annotations

import ast
import itertools
import operator
from collections import Counter
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchingTracer

FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})


# --- constants -----------------------------------------------------------------------------------

def const_array(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def const_scalar(value: ir.Value | None) -> float | None:
    array = const_array(value)
    if array is None or array.size != 1:
        return None
    return float(array.reshape(()))


def const_ints(value: ir.Value | None) -> list[int] | None:
    array = const_array(value)
    if array is None or array.ndim > 1 or not np.issubdtype(array.dtype, np.integer):
        return None
    return [int(v) for v in array.reshape(-1)]


def has_subgraph(node: ir.Node) -> bool:
    """Control flow (If, Loop, Scan): a graph-valued attribute."""
    return any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())


def attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def static_dim(value: ir.Value | None, axis: int) -> int | None:
    """The size of ``axis`` when it is a known integer."""
    if value is None or value.shape is None or not -value.shape.rank() <= axis < value.shape.rank():
        return None
    dim = value.shape[axis]
    return dim if isinstance(dim, int) else None


def rank(value: ir.Value | None) -> int | None:
    return None if value is None or value.shape is None else value.shape.rank()


def opset_version(model: ir.Model, domain: str = "") -> int:
    return model.graph.opset_imports.get(domain, model.opset_imports.get(domain, 0))


# --- probes --------------------------------------------------------------------------------------

class ProbeError(Exception):
    """The subgraph cannot be run on sample data (the message says why)."""


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.FloorDiv: operator.floordiv}
_CALLS = {"Max": max, "Min": min}


class SampleDims:
    """Gives every symbolic dimension a concrete size, the same size wherever the name appears.

    Sizes are distinct primes above typical head counts, so a probe cannot pass by a
    coincidence of sizes. Expressions from the dynamo exporter ("s2 + s70", "Max(0, s75 - 63)") are
    evaluated.
    """

    def __init__(self, sizes: Iterable[int] = (7, 11, 13, 17, 19, 23, 29, 31, 37, 41),
                 named: Mapping[str, int] | None = None):
        """``named``: sizes fixed in advance; with ``sizes=()`` any other symbol is a ProbeError."""
        self._free = iter(sizes)
        self._sizes: dict[str, int] = dict(named or {})

    def size(self, dim: int | ir.SymbolicDim) -> int:
        if isinstance(dim, int):
            return dim
        name = dim.value
        if name is None or name.startswith("unk__"):
            raise ProbeError("a dimension is unknown")
        if name.isidentifier():
            return self._symbol(name)
        return self._evaluate(ast.parse(name, mode="eval").body)

    def shape(self, shape: ir.Shape | None) -> tuple[int, ...]:
        if shape is None:
            raise ProbeError("a shape is unknown")
        return tuple(self.size(d) for d in shape)

    def fresh(self) -> int:
        return self._symbol(f"__fresh{len(self._sizes)}")

    def sample_shape(self, shape: ir.Shape | None) -> tuple[int, ...]:
        """Like ``shape``, for a tensor we feed: its unknown dimensions get sizes of their own
        (Shape nodes in the slice then read the fed array's real shape)."""
        if shape is None:
            raise ProbeError("a shape is unknown")
        sizes = []
        for dim in shape:
            try:
                sizes.append(self.size(dim))
            except ProbeError:
                sizes.append(self.fresh())
        return tuple(sizes)

    def _symbol(self, name: str) -> int:
        if name not in self._sizes:
            try:
                self._sizes[name] = next(self._free)
            except StopIteration:
                raise ProbeError("too many symbolic dimensions") from None
        return self._sizes[name]

    def _evaluate(self, node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return self._symbol(node.id)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](self._evaluate(node.left), self._evaluate(node.right))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _CALLS \
                and node.args and not node.keywords:  # sympy's Max/Min (dynamo, sliding-window crops)
            return _CALLS[node.func.id](self._evaluate(a) for a in node.args)
        raise ProbeError(f"cannot evaluate dimension expression {ast.unparse(node)!r}")


_MAX_PROBE_CONSTANT_BYTES = 256 << 20
_MAX_SLICE_DEPTH = 100  # nodes between a probed value and its feeds; keeps recursion shallow


class _SliceBuilder:
    """Collects the nodes computing some values from fed values, constants and known shapes."""

    def __init__(self, feeds: Mapping[ir.Value, np.ndarray], dims: SampleDims):
        self.feeds, self.dims = feeds, dims
        self.nodes: list[onnx.NodeProto] = []
        self.constants: dict[str, np.ndarray] = {}
        self._seen: set[ir.Value] = set()
        self._computable_memo: dict[ir.Value, bool] = {}

    def visit(self, value: ir.Value, depth: int = 0) -> None:
        if value in self._seen:
            return
        if depth > _MAX_SLICE_DEPTH:
            raise ProbeError("it is computed from too far up the graph")
        self._seen.add(value)
        if not value.name:
            raise ProbeError("a value has no name")
        if value in self.feeds:
            return
        array = const_array(value)
        if array is not None:
            if array.nbytes > _MAX_PROBE_CONSTANT_BYTES:  # a precomputed [max_pos, max_pos] causal mask, say
                raise ProbeError(f"it reads a {array.nbytes >> 20} MiB constant")
            self.constants[value.name] = array
            return
        node = value.producer()
        if node is None:
            raise ProbeError(f"it depends on graph input {value.name!r}")
        if node.op_type in ("Shape", "Size") and node.domain == "" and not self._computable(node.inputs[0]):
            # The shape of something outside the slice: use its declared (symbolic) shape.
            self.constants[value.name] = self._shape_of(node)
            return
        if has_subgraph(node):
            raise ProbeError(f"it contains control flow ({node.op_type})")
        for inp in node.inputs:
            if inp is not None:
                self.visit(inp, depth + 1)
        for out in node.outputs:
            self._seen.add(out)
        self.nodes.append(ir.serde.serialize_node(node))

    def _computable(self, value: ir.Value, depth: int = 64) -> bool:
        """Whether ``value`` follows from the feeds and constants (so its real shape is known)."""
        if value in self._computable_memo:
            return self._computable_memo[value]
        node = value.producer()
        if value in self.feeds or const_array(value) is not None:
            result = True
        elif node is None or depth == 0:
            result = False
        elif node.op_type in ("Shape", "Size"):
            result = True
        else:
            result = all(self._computable(i, depth - 1) for i in node.inputs if i is not None)
        self._computable_memo[value] = result
        return result

    def _shape_of(self, node: ir.Node) -> np.ndarray:
        source = node.inputs[0]
        shape = self.feeds[source].shape if source in self.feeds else self.dims.shape(source.shape)
        if node.op_type == "Size":
            return np.array(int(np.prod(shape)), dtype=np.int64)
        start, end = attr_int(node, "start", 0), attr_int(node, "end", len(shape))
        return np.array(shape[start:end] if end else shape[start:0], dtype=np.int64)


def run_slice(outputs: Sequence[ir.Value], feeds: Mapping[ir.Value, np.ndarray],
              opsets: Mapping[str, int], dims: SampleDims | None = None) -> list[np.ndarray]:
    """Evaluate ``outputs`` from ``feeds`` with onnx's ReferenceEvaluator.

    Everything else the slice reads must be a constant or the shape of a value whose
    dimensions are known (symbolic ones get sample sizes from ``dims``).
    """
    builder = _SliceBuilder(feeds, dims or SampleDims())
    for value in outputs:
        builder.visit(value)
    graph = onnx.helper.make_graph(
        builder.nodes, "probe",
        [onnx.helper.make_tensor_value_info(v.name, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
         for v, a in feeds.items()],
        [onnx.helper.make_tensor_value_info(v.name, onnx.TensorProto.UNDEFINED, None) for v in outputs],
        [onnx.numpy_helper.from_array(a, n) for n, a in builder.constants.items()])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opsets.items()])
    try:
        return ReferenceEvaluator(model).run(None, {v.name: a for v, a in feeds.items()})
    except Exception as e:  # the reference evaluator raises many kinds; all mean "cannot tell"
        raise ProbeError(f"evaluating it failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from e


def sample_like(value: ir.Value, dims: SampleDims, rng: np.random.Generator) -> np.ndarray:
    dtype = value.dtype.numpy() if value.dtype is not None else np.float32
    return rng.standard_normal(dims.sample_shape(value.shape)).astype(dtype)


# --- notes ---------------------------------------------------------------------------------------

def explain_no_match(rules: Sequence[pattern.RewriteRule], model: ir.Model, anchors: Iterable[ir.Node]) -> str:
    """The reason the best partial match of ``rules`` at any of ``anchors`` failed."""
    tracer = MatchingTracer()
    for node, rule in itertools.product(anchors, rules):
        rule.match(model, node.graph, node, tracer=tracer, check_nodes_are_removable=rule.remove_nodes)
    best = [infos[0] for infos in tracer.best_matches_map.values() if infos]
    if not best:
        return "the pattern did not match"
    info = max(best, key=lambda i: i.score())
    return info.match_result.reason or "the pattern did not match"


def downstream_nodes(node: ir.Node, depth: int) -> list[ir.Node]:
    """Nodes reachable from ``node``'s outputs in at most ``depth`` steps (``node`` included)."""
    found, frontier = [node], [node]
    for _ in range(depth):
        frontier = [user for n in frontier for out in n.outputs for user, _ in out.uses() if user not in found]
        found.extend(dict.fromkeys(frontier))
    return found


def summarize(prefix: str, what: str, reasons: Sequence[str]) -> list[str]:
    """'attention: 2 Softmax nodes not fused: mask shape not broadcastable' style notes."""
    return [f"{prefix}: {n} {what} not fused: {reason}" for reason, n in Counter(reasons).most_common()]
