"""kvc's pass base: onnx-ir PassResult.modified, preconditions in requires(), errors reaching the user."""
from __future__ import annotations

import onnx_ir as ir
import pytest

from kvc.errors import GraphError
from kvc.passes.base import KvcPass, PassReport
from kvc.passes.canonicalize import CanonicalizePass
from kvc.passes.fuse_rms_norm import FuseRmsNormPass


def identity_model(opset: int) -> ir.Model:
    x = ir.val("x", ir.DataType.FLOAT, [2])
    node = ir.node("Identity", [x])
    node.outputs[0].name, node.outputs[0].type, node.outputs[0].shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape([2])
    graph = ir.Graph([x], [node.outputs[0]], nodes=[node], opset_imports={"": opset})
    return ir.Model(graph, ir_version=8)


def test_an_opset_upgrade_alone_counts_as_modified():
    result = CanonicalizePass()(identity_model(18))
    assert result.modified and result.model.opset_imports[""] == 23


def test_below_min_opset_the_pass_is_skipped_with_a_note():
    fuse = FuseRmsNormPass()
    result = fuse(identity_model(18))
    assert not result.modified
    assert fuse.report.notes == ["skipped: model opset 18 < 23 (canonicalize first)"]


class _Refusing(KvcPass):
    name = "refusing"

    def requires(self, model: ir.Model) -> None:
        raise GraphError("this graph is not for me")

    def apply(self, model: ir.Model) -> PassReport:  # pragma: no cover - never reached
        raise AssertionError


def test_a_refusal_in_requires_reaches_the_user_as_a_graph_error():
    with pytest.raises(GraphError, match="not for me"):
        _Refusing()(identity_model(23))
