"""ORT lowering: fp8 cache rings are written through a float16 carrier.

Why: ONNX Runtime 1.31's CPU TensorScatter has no float8 kernel (and the standard
ScatterND/ScatterElements take no float8 at all). The neutral quantize pass writes an fp8 ring with
a plain ``TensorScatter(past_fp8, update_fp8, write_index)``; here each becomes

  present = Cast(TensorScatter(Cast(past, fp16), Cast(update, fp16), write_index), fp8)

Every e4m3fn value is exact in float16, so the result is bit-identical, at the price of two passes
over the cache per step. Other engines (TVM) scatter the fp8 bytes in place and skip this pass.
"""
from __future__ import annotations

import onnx_ir as ir

from kvc.contract import is_past
from kvc.passes.base import KvcPass, PassReport

CARRIER = ir.DataType.FLOAT16
FP8 = ir.DataType.FLOAT8E4M3FN
CARRIER_SUFFIX = ".fp16"  # the carrier scatter's output: the present name with this suffix


class LowerOrtFp8ScatterPass(KvcPass):
    name = "lower_ort_fp8_scatter"

    def apply(self, model: ir.Model) -> PassReport:
        graph = model.graph
        scatters = [node for node in graph if _writes_fp8_ring(node)]
        for scatter in scatters:
            _through_carrier(graph, scatter)
        graph.sort()
        report = PassReport(self.name, matched=len(scatters))
        if scatters:
            report.notes.append("fp8 ring written through a float16 copy: ONNX Runtime 1.31 CPU has no float8 "
                                "TensorScatter")
        return report


def _writes_fp8_ring(node: ir.Node) -> bool:
    past = node.inputs[0] if node.op_type == "TensorScatter" and node.inputs else None
    return past is not None and past.dtype == FP8 and past.is_graph_input() and is_past(past.name or "")


def _through_carrier(graph: ir.Graph, scatter: ir.Node) -> None:
    tape = ir.tape.Tape(graph)
    present = scatter.outputs[0]
    uses = list(present.uses())
    scatter.replace_input_with(0, tape.op("Cast", [scatter.inputs[0]], {"to": CARRIER}))
    scatter.replace_input_with(1, tape.op("Cast", [scatter.inputs[1]], {"to": CARRIER}))
    narrowed = tape.op("Cast", [present], {"to": FP8})
    narrowed.shape, narrowed.type = present.shape, ir.TensorType(FP8)
    for node, index in uses:
        node.replace_input_with(index, narrowed)
    if present.is_graph_output():
        outputs = list(graph.outputs)
        graph.outputs[outputs.index(present)] = narrowed
    name, present.name = present.name, f"{present.name}{CARRIER_SUFFIX}"
    present.type = ir.TensorType(CARRIER)
    narrowed.name = name
