"""Shape reads of a present cache that an attention node's own inputs depend on.

Exporters of transformers' sdpa/eager attention crop the mask to the key length read off the
repeated present key (``mask[..., :repeat_kv(cat(past_key, k)).shape[-2]]``; optimum-onnx does):

    present_key_BKTD = Concat(past_key_BKPD, key_BKSD, axis=2)
    ... Unsqueeze / Expand / Reshape (repeat_kv) ... -> Shape -> Gather(-2) -> Slice(mask) -> Attention

Folding that Concat into ``Attention(..., past_key) -> present_key`` would make the mask read the
Attention's own output: a cycle. ``detach_shape_reads`` first replaces every such Shape with the
same dims computed from the Concat's inputs (the sequence axis as past length + new length, the
others from the new key, which holds no past data), so the Concat's only remaining readers are
downstream of the Attention. What the dims are is learnt by probing the Shape's slice on sample
data (onnx's ReferenceEvaluator), so any chain of data-movement ops works; a read of the cache's
values, or a dim that is not one of the cache's dims, is refused by name and the graph stays as it was.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import onnx_ir as ir

from kvc.passes._patterns import ProbeError, SampleDims, attr_int, run_slice, sample_like

# Ops through which a tensor's data only moves: a Shape after them reads the source's dims.
_DATA_MOVEMENT = frozenset({"Transpose", "Reshape", "Expand", "Unsqueeze", "Squeeze", "Tile", "Identity",
                            "Flatten"})
# Two sets of sample sizes with no size in common: a dim that follows a symbolic dim of the cache
# changes between the probes, a constant does not.
_PROBE_SIZES = ((7, 11, 13, 17, 19, 23, 29, 31, 37, 41), (43, 47, 53, 59, 61, 67, 71, 73, 79, 83))


class ShapeReadError(Exception):
    """A use of the present cache that feeds the attention node and cannot be rewritten (names the node)."""


def ancestors(values: Iterable[ir.Value | None]) -> set[ir.Node]:
    """Every node the ``values`` depend on (their producers included)."""
    seen: set[ir.Node] = set()
    stack = [v for v in values if v is not None]
    while stack:
        producer = stack.pop().producer()
        if producer is None or producer in seen:
            continue
        seen.add(producer)
        stack.extend(v for v in producer.inputs if v is not None)
    return seen


def upstream_users(value: ir.Value, upstream: set[ir.Node]) -> list[ir.Node]:
    """Users of ``value`` among ``upstream`` (a node's ancestors): making ``value`` an output of that node
    would be a cycle."""
    return [user for user, _ in value.uses() if user in upstream]


def describe(nodes: list[ir.Node]) -> str:
    return ", ".join(f"{n.op_type} {n.name!r}" for n in nodes)


def detach_shape_reads(concat: ir.Node, attention: ir.Node, opsets: dict[str, int]) -> int:
    """Rewrite the Shape reads of ``concat``'s output that ``attention`` depends on; returns how many.

    Raises ShapeReadError (graph unchanged) when a read cannot be rewritten."""
    present = concat.outputs[0]
    upstream = ancestors(attention.inputs)
    shape_nodes = _shape_reads(present, attention, upstream)
    if not shape_nodes:
        return 0
    plans = [(node, _dims_read(node, present, opsets)) for node in shape_nodes]  # all probed before any change
    builder = _DimBuilder(concat)
    for node, dims in plans:
        replacement = builder.shape(dims, before=node)
        ir.convenience.replace_all_uses_with(node.outputs[0], replacement)
    return len(plans)


def _shape_reads(present: ir.Value, attention: ir.Node, upstream: set[ir.Node]) -> list[ir.Node]:
    """The Shape nodes through which ``attention``'s inputs read ``present`` (only its dims, else refused)."""
    found: list[ir.Node] = []
    stack = [present]
    while stack:
        value = stack.pop()
        for user, index in value.uses():
            if user is attention or user not in upstream:
                continue  # the fused use, or downstream of the attention: no cycle
            if user.domain == "" and user.op_type == "Shape":
                found.append(user)
            elif user.domain == "" and user.op_type in _DATA_MOVEMENT and index == 0:
                stack.extend(user.outputs)
            else:
                what = "the element count" if user.op_type == "Size" else "the values"
                raise ShapeReadError(f"{user.op_type} node {user.name!r} reads {what} of {present.name!r} "
                                     f"and feeds {attention.op_type} node {attention.name!r}")
    return list(dict.fromkeys(found))


def _dims_read(node: ir.Node, present: ir.Value, opsets: dict[str, int]) -> list[int | np.integer]:
    """Per element of the Shape's output: an axis of ``present`` (int) or a constant (numpy int)."""
    probes = []
    for sizes in _PROBE_SIZES:
        dims = SampleDims(sizes)
        try:
            sample = sample_like(present, dims, np.random.default_rng(0))
            (got,) = run_slice([node.outputs[0]], {present: sample}, opsets, dims)
        except ProbeError as e:
            raise ShapeReadError(f"Shape node {node.name!r} on {present.name!r}: {e}") from e
        probes.append((sample.shape, np.asarray(got).reshape(-1)))
    (shape_a, got_a), (shape_b, got_b) = probes
    symbolic = [axis for axis in range(len(shape_a)) if shape_a[axis] != shape_b[axis]]
    result: list[int | np.integer] = []
    for first, second in zip(got_a, got_b):
        if first == second:
            result.append(np.int64(first))
            continue
        axes = [a for a in symbolic if shape_a[a] == first and shape_b[a] == second]
        if len(axes) != 1:
            raise ShapeReadError(f"Shape node {node.name!r} reads a dim that is not one of {present.name!r}'s dims")
        result.append(axes[0])
    return result


@dataclass
class _DimBuilder:
    """The present cache's dims as 1-element int64 values, built from the Concat's inputs."""

    concat: ir.Node
    _dims: dict[int, ir.Value] = field(default_factory=dict)
    _constants: int = 0

    def shape(self, dims: list[int | np.integer], before: ir.Node) -> ir.Value:
        nodes: list[ir.Node] = []
        parts = [self._dim(d, nodes) if isinstance(d, int) else self._constant(d, nodes) for d in dims]
        joined = self._node("Concat", parts, f"{before.name}_from_inputs", nodes, axis=0)
        before.graph.insert_before(before, nodes)
        return joined

    def _node(self, op_type: str, inputs: list[ir.Value], name: str, nodes: list[ir.Node], **attributes) -> ir.Value:
        """A node whose output is named (probes of later passes need names)."""
        node = ir.node(op_type, inputs, attributes=attributes, name=name,
                       outputs=[ir.Value(name=f"{name}_output")])
        nodes.append(node)
        return node.outputs[0]

    def _dim(self, axis: int, nodes: list[ir.Node]) -> ir.Value:
        if axis in self._dims:
            return self._dims[axis]
        past, new = self.concat.inputs
        present = self.concat.outputs[0]
        rank = present.shape.rank() if present.shape is not None else 4
        prefix = f"{self.concat.name}_dim{axis}"
        value = self._node("Shape", [new], f"{prefix}_new", nodes, start=axis, end=axis + 1)
        if axis == attr_int(self.concat, "axis", 0) % rank:  # past length + new length
            past_len = self._node("Shape", [past], f"{prefix}_past", nodes, start=axis, end=axis + 1)
            value = self._node("Add", [past_len, value], f"{prefix}_total", nodes)
        self._dims[axis] = value
        return value

    def _constant(self, dim: np.integer, nodes: list[ir.Node]) -> ir.Value:
        self._constants += 1
        name = f"{self.concat.name}_const{self._constants}"
        return self._node("Constant", [], name, nodes, value=ir.tensor(np.array([dim], dtype=np.int64)))
