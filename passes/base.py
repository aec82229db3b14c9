"""Pass infrastructure: every kvc pass is an onnx-ir in-place pass that also reports what it did.

A pass sets ``self.report`` while it runs: how many times its pattern matched and, when it
matched less than it might have, why (so a graph it cannot fuse stays correct and says so).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import onnx_ir as ir
import onnx_ir.passes


@dataclass
class PassReport:
    name: str
    matched: int = 0
    notes: list[str] = field(default_factory=list)  # why a candidate did not match, warnings
    max_abs_diff: float | None = None  # filled by --verify

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class KvcPass(onnx_ir.passes.InPlacePass):
    """Base class: subclasses set ``name`` and implement ``apply(model) -> PassReport``."""

    name: str = "unnamed"
    #: True when the pass changes the graph's inputs/outputs (ring buffer, quantized cache),
    #: so --verify cannot compare it to the previous graph on identical inputs.
    changes_io: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.report = PassReport(self.name)

    def apply(self, model: ir.Model) -> PassReport:  # pragma: no cover - abstract
        raise NotImplementedError

    def call(self, model: ir.Model) -> onnx_ir.passes.PassResult:
        self.report = self.apply(model)
        return onnx_ir.passes.PassResult(model, modified=self.report.matched > 0)
