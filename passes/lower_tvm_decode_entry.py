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
        fixed: dict[str, int] = {}
        for value in model.graph.inputs:
            if value.shape is None or len(value.shape) == 0:
                continue
            dims = list(value.shape)
            if value.name in ONE_TOKEN_INPUTS:
                dims[1] = 1
            if batch is not None:
                dims[0] = batch
            if dims != list(value.shape):
                fixed.update(_symbols_fixed(value.shape, dims))
                value.shape = ir.Shape(dims)
                report.matched += 1
        _substitute_symbols(model.graph, fixed)
        masks = drop_redundant_ring_masks(model.graph)  # before folding renames the ring's constants
        onnxscript.optimizer.optimize_ir(model, num_iterations=2, should_fold=_keeps_stored_weights)
        rows = "1 row" if batch == 1 else "any rows"
        report.notes.append(f"{report.matched} input shapes fixed to one new token, {rows}; shape arithmetic folded; "
                            f"{masks} ring masks implied by nonpad_kv_seqlen dropped")
        return report


def _keeps_stored_weights(node: ir.Node) -> bool | None:
    """Folding may not widen a weight stored in another dtype (--weights fp16/bf16: Cast(W) -> MatMul); the
    packing pass that follows reads it as stored. onnxscript's own rules decide everything else (None)."""
    source = node.inputs[0] if node.op_type == "Cast" and node.inputs else None
    if source is not None and source.is_initializer() and source.shape is not None and len(source.shape) >= 2:
        return False
    return None


def _symbols_fixed(before: ir.Shape, after: list) -> dict[str, int]:
    """{symbol: size} for the symbolic dims of ``before`` that ``after`` fixes to an integer."""
    return {str(old.value): new for old, new in zip(before, after)
            if isinstance(old, ir.SymbolicDim) and old.value is not None and isinstance(new, int)}


def _substitute_symbols(graph: ir.Graph, fixed: dict[str, int]) -> None:
    """The fixed symbols' sizes in every shape the graph records. Exporters (torch's dynamo exporter) name the
    sequence dim in each intermediate value's shape; left there, the folding below would still see a symbolic
    sequence length (e.g. in Shape(keys)[2], which the ring mask's Range reads) and keep the arithmetic dynamic."""
    if not fixed:
        return
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for value in node.outputs:
            if value.shape is not None and any(_is_fixed(d, fixed) for d in value.shape):
                value.shape = ir.Shape([fixed[str(d.value)] if _is_fixed(d, fixed) else d for d in value.shape])


def _is_fixed(dim, fixed: dict[str, int]) -> bool:
    return isinstance(dim, ir.SymbolicDim) and dim.value is not None and str(dim.value) in fixed
