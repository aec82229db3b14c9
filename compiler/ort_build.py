"""The ONNX Runtime engine's build step: the optimized graph plus its in-place binding plan."""
from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

from kvc.contract import GRAPH_DATA_FILE, GRAPH_FILE, ORT_ENTRY, is_past, present_for
from kvc.errors import GraphError
from kvc.runtime.artifact import EntryPoint

GRAPH = GRAPH_FILE


def build_ort(model: ir.Model, staging: Path) -> tuple[list[EntryPoint], dict]:
    aliases = in_place_aliases(model)
    ir.save(model, staging / GRAPH, external_data=GRAPH_DATA_FILE)
    shapes = {v.name: _shape(v) for v in model.graph.inputs}
    outs = {v.name: _shape(v) for v in model.graph.outputs}
    # One graph serves prefill (seq > 1) and decode (seq == 1): ONNX Runtime handles both shapes.
    entry = EntryPoint(name=ORT_ENTRY, inputs=shapes, outputs=outs, aliases=aliases)
    return [entry], {"graph": GRAPH, "cache_update": sorted(set(update_kinds(model, aliases).values()))}


def in_place_aliases(model: ir.Model) -> dict[str, str]:
    """present.* output -> past_key_values.* input whose buffer it may overwrite.

    Binding both to one buffer is safe when every reader of the input runs before the node that
    writes the output (ONNX Runtime executes nodes sequentially in topological order): true when
    all readers are ancestors of that node. In the usual form the single reader *is* the writer,
    a TensorScatter that updates the cache in place; the fp8 cache on ORT CPU (no float8
    TensorScatter kernel) reads through a Cast and is written back by another Cast.
    """
    outputs = {v.name: v for v in model.graph.outputs}
    aliases = {}
    for value in model.graph.inputs:
        if not is_past(value.name):
            continue
        out_name = present_for(value.name)
        writer = outputs[out_name].producer() if out_name in outputs else None
        readers = [use.node for use in value.uses()]
        if writer is None or not readers or not all(r is writer or r in _ancestors(writer) for r in readers):
            raise GraphError(f"cache input {value.name} cannot share a buffer with {out_name}: some reader of it "
                             "runs after the cache is written; run the KV ring-buffer pass on this graph")
        aliases[out_name] = value.name
    if not aliases:
        raise GraphError("graph has no ring-buffer cache inputs to bind in place; run the KV ring-buffer pass")
    return aliases


def update_kinds(model: ir.Model, aliases: dict[str, str]) -> dict[str, str]:
    """How each cache is updated: 'TensorScatter' (in place) or the op that writes it back."""
    outputs = {v.name: v for v in model.graph.outputs}
    return {out: outputs[out].producer().op_type for out in aliases}


def _ancestors(node: ir.Node) -> set[ir.Node]:
    seen: set[ir.Node] = set()
    stack = [node]
    while stack:
        for inp in stack.pop().inputs:
            producer = inp.producer() if inp is not None else None
            if producer is not None and producer not in seen:
                seen.add(producer)
                stack.append(producer)
    return seen


def _shape(value: ir.Value) -> list:
    if value.shape is None:
        return []
    return [d if isinstance(d, int) else str(d) for d in value.shape]
