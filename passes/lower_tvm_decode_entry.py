"""TVM lowering, per entry point: a copy of the lowered graph specialized for one decode step.

The TVM engine imports the graph once per entry (kvc.compiler.tvm.engine_build): prefill as it is,
``decode`` with one new token per row (input_ids / position_ids [batch, 1]) and ``decode_b1`` with
one row as well (static shapes everywhere). Fixing those dims lets constant folding remove the shape
arithmetic they made dynamic (e.g. the ring mask's Range(0, seq)), and lets TVM pick GEMV schedules
for the projections. With one new token and no window, the ring mask says nothing nonpad_kv_seqlen does
not, so it is dropped (kvc.passes.decode_ring_mask): decode no longer computes a capacity-wide mask.
Runs on a copy per entry, after the graph-wide lowering passes.
"""
from __future__ import annotations

import onnx_ir as ir

from kvc.contract import INPUT_IDS, POSITION_IDS, Entry
from kvc.passes.base import KvcPass, PassReport
from kvc.passes.decode_ring_mask import drop_redundant_ring_masks

ONE_TOKEN_INPUTS = (INPUT_IDS, POSITION_IDS)  # [batch, seq] inputs: seq = 1 in decode
DECODE_BATCH = {Entry.DECODE: None, Entry.DECODE_B1: 1}  # rows fixed by the entry (None: dynamic)


class LowerTvmDecodeEntryPass(KvcPass):
    changes_io = True  # the inputs' shapes become fixed

    def __init__(self, entry: Entry):
        if entry not in DECODE_BATCH:
            raise ValueError(f"{entry.value} is not a decode entry point; expected one of "
                             f"{', '.join(e.value for e in DECODE_BATCH)}")
        self.entry = entry
        self.name = f"lower_tvm_{entry.value}_entry"
        super().__init__()

    def apply(self, model: ir.Model) -> PassReport:
        import onnxscript.optimizer

        report = PassReport(self.name)
        batch = DECODE_BATCH[self.entry]
        for value in model.graph.inputs:
            if value.shape is None or len(value.shape) == 0:
                continue
            dims = list(value.shape)
            if value.name in ONE_TOKEN_INPUTS:
                dims[1] = 1
            if batch is not None:
                dims[0] = batch
            if dims != list(value.shape):
                value.shape = ir.Shape(dims)
                report.matched += 1
        masks = drop_redundant_ring_masks(model.graph)  # before folding renames the ring's constants
        onnxscript.optimizer.optimize(model, num_iterations=2)
        rows = "1 row" if batch == 1 else "any rows"
        report.notes.append(f"{report.matched} input shapes fixed to one new token, {rows}; shape arithmetic folded; "
                            f"{masks} ring masks implied by nonpad_kv_seqlen dropped")
        return report
