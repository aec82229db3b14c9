"""TVM lowering: 4-bit weight codes (INT4 / UINT4 initializers read by DequantizeLinear) stored as
INT8 / UINT8 with the same values.

Why: TVM's ONNX importer cannot load 4-bit initializers (it copies one byte per element into a tensor
TVM packs two per byte). The DequantizeLinear that reads the codes is unchanged (same scales, zero
points, block size), so the decoded weights are bit-identical. The cost: on the TVM engine int4
weights take int8's memory and bandwidth until it gets a packed 4-bit matmul kernel.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kvc.passes.base import KvcPass, PassReport

_WIDER = {ir.DataType.INT4: np.int8, ir.DataType.UINT4: np.uint8}


class LowerTvmWeightCodesPass(KvcPass):
    name = "lower_tvm_weight_codes"

    def apply(self, model: ir.Model) -> PassReport:
        report = PassReport(self.name)
        for name, value in list(model.graph.initializers.items()):
            tensor = value.const_value
            if tensor is None or tensor.dtype not in _WIDER:
                continue
            if not all(u.node.op_type == "DequantizeLinear" and u.idx in (0, 2) for u in value.uses()):
                report.notes.append(f"{name}: 4-bit initializer read by something other than DequantizeLinear; "
                                    "left as is")
                continue
            wide = tensor.numpy().astype(np.int32).astype(_WIDER[tensor.dtype])
            value.const_value = ir.tensor(wide, name=name)
            value.dtype = ir.DataType.from_numpy(wide.dtype)
            report.matched += 1
        if report.matched:
            report.notes.append("4-bit codes stored one per byte (TVM has no packed 4-bit matmul yet)")
        return report
