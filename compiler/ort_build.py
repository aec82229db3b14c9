"""The ONNX Runtime engine's build step: the optimized graph plus its in-place binding plan."""
from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

from kvc.errors import GraphError
from kvc.runtime.artifact import EntryPoint

GRAPH = "graph.onnx"


def build_ort(model: ir.Model, staging: Path) -> tuple[list[EntryPoint], dict]:
    aliases = in_place_aliases(model)
    ir.save(model, staging / GRAPH, external_data=GRAPH + ".data")
    shapes = {v.name: _shape(v) for v in model.graph.inputs}
    outs = {v.name: _shape(v) for v in model.graph.outputs}
    # One graph serves prefill (seq > 1) and decode (seq == 1): ONNX Runtime handles both shapes.
    entry = EntryPoint(name="forward", inputs=shapes, outputs=outs, aliases=aliases)
    return [entry], {"graph": GRAPH}


def in_place_aliases(model: ir.Model) -> dict[str, str]:
    """present.* output -> past_key_values.* input it may overwrite.

    Binding both to one buffer is only safe when the cache input's single reader is the
    TensorScatter that produces the aliased output; anything else would read half-updated data.
    """
    outputs = {v.name: v for v in model.graph.outputs}
    aliases = {}
    for value in model.graph.inputs:
        if not value.name.startswith("past_key_values."):
            continue
        users = list(value.uses())
        out_name = "present." + value.name[len("past_key_values."):]
        if len(users) != 1 or users[0].node.op_type != "TensorScatter" or out_name not in outputs \
                or users[0].node.outputs[0] is not outputs[out_name]:
            raise GraphError(f"cache input {value.name} is not updated by exactly one TensorScatter producing "
                             f"{out_name}; the in-place ring-buffer pass did not run on this graph")
        aliases[out_name] = value.name
    if not aliases:
        raise GraphError("graph has no ring-buffer cache inputs (past_key_values.*) to bind in place")
    return aliases


def _shape(value: ir.Value) -> list:
    if value.shape is None:
        return []
    return [d if isinstance(d, int) else str(d) for d in value.shape]
