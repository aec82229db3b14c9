"""ORT lowering: the ring's slot count comes from the bound cache buffers, not a compile-time constant.

Why: ONNX Runtime's CPU ``Attention`` computes scores over every slot of the cache it is given and
masks the unused ones; ``DequantizeLinear`` of an int8/fp8 ring converts every slot; the ring mask
is [B, 1, S, C]. With the capacity C baked in, a 32768-slot build pays for 32768 slots on every
step of a 100-token chat. After this pass the graph reads C from the cache input's shape, so the
runtime may bind buffers of any size N >= the tokens held (kvc.runtime.ort_engine grows them in
power-of-two steps up to the compiled capacity), and every per-step cost follows N, i.e. the live
context. Alternatives considered: ORT's contrib GroupQueryAttention with a shared buffer reads only
the live length too, but writes linearly (no ring wrap, so no --on-overflow slide or attention
sinks) and has no int8/fp8 cache on CPU; a custom-op library would need ORT's C headers and a
native build per platform. Standard ops keep the graph runnable by any ONNX runtime.

Semantics are unchanged while N >= past_len + S for every row: slot c < past_len + S holds storage
index c (nothing has wrapped), and slots beyond are invisible, exactly as with N = C. Once any row
reaches the capacity, the runtime binds the full C slots, and wrap-around works as compiled.

Rewrites: the ring pass's ``kvc_ring.capacity`` constant -> Shape(cache)[2], ``kvc_ring.slots``
(arange(C)) -> Range(0, N), and dim 2 of every cache input/output -> the symbol ``kv_slots``.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kvc.contract import PRESENT_ANY_RE, is_past
from kvc.errors import GraphError
from kvc.passes.base import KvcPass, PassReport
from kvc.passes.kv_ring_buffer import CAPACITY_INITIALIZER, SLOTS_INITIALIZER

SLOTS_DIM = "kv_slots"  # symbolic dim 2 of every cache input/output after this pass
TOKEN_AXIS = 2


class LowerOrtLiveSlotsPass(KvcPass):
    name = "lower_ort_live_slots"
    changes_io = True  # cache dims become symbolic: --verify cannot feed both graphs the same inputs

    def apply(self, model: ir.Model) -> PassReport:
        graph = model.graph
        caches = [v for v in graph.inputs if is_past(v.name)]
        capacity = graph.initializers.get(CAPACITY_INITIALIZER)
        if not caches or capacity is None:
            raise GraphError("lower_ort_live_slots needs the ring-buffer graph (kvc_ring.capacity and cache "
                             "inputs); run the KV ring-buffer pass first")
        tape = ir.tape.Tape(graph)
        slots_1 = tape.op("Shape", [caches[0]], {"start": TOKEN_AXIS, "end": TOKEN_AXIS + 1})
        slots = tape.op("Squeeze", [slots_1, tape.initializer(ir.tensor(np.array([0], np.int64),
                                                                       name="kvc_live.axis0"))])
        _replace_initializer(graph, capacity, slots)
        replaced = 1
        arange = graph.initializers.get(SLOTS_INITIALIZER)
        if arange is not None:
            zero = tape.initializer(ir.tensor(np.array(0, np.int64), name="kvc_live.zero"))
            one = tape.initializer(ir.tensor(np.array(1, np.int64), name="kvc_live.one"))
            _replace_initializer(graph, arange, tape.op("Range", [zero, slots, one]))
            replaced += 1
        graph.sort()  # the tape appended its nodes at the end
        _make_slots_symbolic(graph)
        _forget_intermediate_shapes(graph)
        report = PassReport(self.name, matched=replaced)
        report.notes.append("cache slot count read from the bound buffers (dim 2 = kv_slots): per-step cost "
                            "follows the live context; the runtime binds the full capacity once it is reached")
        return report


def _replace_initializer(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    old.replace_all_uses_with(new)
    graph.initializers.pop(old.name)


def _make_slots_symbolic(graph: ir.Graph) -> None:
    cache_values = [v for v in graph.inputs if is_past(v.name)]
    cache_values += [v for v in graph.outputs if PRESENT_ANY_RE.match(v.name)]
    for value in cache_values:
        dims = list(value.shape)
        dims[TOKEN_AXIS] = ir.SymbolicDim(SLOTS_DIM)
        value.shape = ir.Shape(dims)


def _forget_intermediate_shapes(graph: ir.Graph) -> None:
    """Intermediate shapes recorded with the static C would contradict the bound buffers; ONNX Runtime
    infers them again at load."""
    io = {id(v) for v in graph.inputs} | {id(v) for v in graph.outputs}
    for node in graph:
        for value in node.outputs:
            if id(value) not in io:
                value.shape = None
