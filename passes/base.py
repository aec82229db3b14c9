"""Pass infrastructure: every kvc pass is an onnx-ir in-place pass that also reports what it did.

A pass implements ``apply(model) -> PassReport``: how many times its pattern matched and, when it
matched less than it might have, why (so a graph it cannot fuse stays correct and says so). It
sets ``report.modified`` when it changed the graph without a match (an opset upgrade, say); onnx-ir's
``PassResult.modified`` is true when either holds.

Preconditions live in ``requires(model)``, which onnx-ir's ``PassBase.__call__`` runs first:
  * ``min_opset``: the default-domain opset the pass's output ops need. Below it the pass does
    nothing and reports why (raise ``SkipPass``), so a graph canonicalize could not upgrade still
    compiles, unfused.
  * anything else a pass refuses raises a ``KvcError`` (``GraphError``), which reaches the user as
    is, not wrapped in onnx-ir's PreconditionError.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import onnx_ir as ir
import onnx_ir.passes

from kvc.errors import KvcError


@dataclass
class PassReport:
    name: str
    matched: int = 0
    notes: list[str] = field(default_factory=list)  # why a candidate did not match, warnings
    max_abs_diff: float | None = None  # filled by --verify
    modified: bool = False  # changed the graph besides its matches (e.g. an opset upgrade)
    entry: str | None = None  # the entry point whose graph copy it ran on; None: the graph every entry shares

    @property
    def changed_graph(self) -> bool:
        return self.modified or self.matched > 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class SkipPass(Exception):
    """Raised by ``requires``: the pass does not apply to this graph (the message says why)."""


def default_opset(model: ir.Model) -> int:
    return model.graph.opset_imports.get("", model.opset_imports.get("", 0))


class KvcPass(onnx_ir.passes.InPlacePass):
    """Base class: subclasses set ``name`` and implement ``apply(model) -> PassReport``."""

    name: str = "unnamed"
    #: True when the pass changes the graph's inputs/outputs (ring buffer, quantized cache),
    #: so --verify cannot compare it to the previous graph on identical inputs.
    changes_io: bool = False
    #: False when the pass writes an engine-private op (domain ai.kvc) that ONNX Runtime cannot run,
    #: so --verify cannot run its output either.
    ort_runnable: bool = True
    #: Default-domain opset the pass needs; below it the pass is skipped with a note.
    min_opset: int = 0

    def __init__(self) -> None:
        super().__init__()
        self.report = PassReport(self.name)

    def apply(self, model: ir.Model) -> PassReport:  # pragma: no cover - abstract
        raise NotImplementedError

    def requires(self, model: ir.Model) -> None:
        if default_opset(model) < self.min_opset:
            raise SkipPass(f"skipped: model opset {default_opset(model)} < {self.min_opset} (canonicalize first)")

    def __call__(self, model: ir.Model) -> onnx_ir.passes.PassResult:
        try:
            return super().__call__(model)
        except onnx_ir.passes.PreconditionError as exc:
            cause = exc.__cause__
            if isinstance(cause, SkipPass):
                self.report = PassReport(self.name, notes=[str(cause)])
                return onnx_ir.passes.PassResult(model, modified=False)
            if isinstance(cause, KvcError):
                raise cause from None
            raise

    def call(self, model: ir.Model) -> onnx_ir.passes.PassResult:
        self.report = self.apply(model)
        return onnx_ir.passes.PassResult(model, modified=self.report.changed_graph)
