"""Reshape proofs (kvc.passes.reshape_inferred_dim, kvc.passes.unflatten_matmul): a -1 dim resolved by
cancelling symbols, flatten-MatMul-unflatten chains made MatMuls; and the TVM lowering's one-element MatMul made a Mul.
Each rewrite is checked against ONNX Runtime on the unchanged graph, on random inputs of two batch/sequence sizes;
refusals leave the graph as it was."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx_ir.passes.common import ShapeInferencePass

from kvc.passes.reshape_inferred_dim import cancelled_size, resolve_reshape_dims
from kvc.passes.unflatten_matmul import ReshapeProofs, prove_reshapes

B, S = ir.SymbolicDim("batch"), ir.SymbolicDim("seq")
FLOAT, INT64 = ir.DataType.FLOAT, ir.DataType.INT64


@pytest.mark.parametrize("in_dims, out_dims, want", [
    ([B, S, 64], [B, S, 16], 4),                # view(b, s, -1, 16): the head count
    ([B, S], [S], B),                            # GPT-2's input_ids.view(-1, seq): batch is what is left
    ([B, S, 64], [16], None),                    # batch * seq * 4 is no single dim
    ([B, S, 64], [B, S, 48], None),              # 64 is not a multiple of 48
    ([B, S, 64], [B, ir.SymbolicDim("other"), 16], None),  # a symbol the input does not have
    ([B, ir.SymbolicDim("unk__3"), 64], [B, 16], None),    # ONNX's stand-in for "unknown" proves nothing
])
def test_cancelled_size(in_dims, out_dims, want):
    assert cancelled_size(ir.Shape(in_dims), out_dims) == want


def _session(model: ir.Model) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])


def _head_split_model() -> ir.Model:
    """x [batch, seq, 64] -> Reshape(x, Concat(Shape(x)[:2], [-1, 16])) -> Transpose -> y: TorchScript's
    ``view(*x.shape[:-1], -1, 16)``; with the leading dims computed, ONNX's inference loses the head count."""
    x = ir.val("x", FLOAT, [B, S, 64])
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 23}, name="split")
    tape = ir.tape.Tape(graph)
    tail = tape.initializer(ir.tensor(np.array([-1, 16], np.int64), name="tail"))
    target = tape.op("Concat", [tape.op("Shape", [x], {"start": 0, "end": 2}), tail], {"axis": 0})
    heads = tape.op("Reshape", [x, target])
    y = tape.op("Transpose", [heads], {"perm": [0, 2, 1, 3]})
    y.name = "y"
    graph.outputs.append(y)
    return ir.Model(graph, ir_version=10)


def test_a_head_count_behind_minus_one_reaches_the_shapes_downstream():
    model = _head_split_model()
    rng = np.random.default_rng(2)
    feeds = [rng.standard_normal((batch, seq, 64)).astype(np.float32) for batch, seq in ((2, 3), (1, 1))]
    want = [_session(model).run(None, {"x": x})[0] for x in feeds]
    ShapeInferencePass()(model)
    reshape = next(n for n in model.graph if n.op_type == "Reshape")
    assert not isinstance(reshape.outputs[0].shape[2], int)  # what ONNX's inference alone leaves
    assert resolve_reshape_dims(model) == 1
    ShapeInferencePass()(model)
    transpose = next(n for n in model.graph if n.op_type == "Transpose")
    assert list(transpose.outputs[0].shape)[1:] == [4, S, 16]
    for x, expected in zip(feeds, want):  # a recorded shape only: the graph computes what it did
        np.testing.assert_array_equal(_session(model).run(None, {"x": x})[0], expected)


def _conv1d_model(gemm: bool, bias: bool = True, restore: str = "leading") -> ir.Model:
    """GPT-2's Conv1D: x [batch, seq, 8] -> Reshape(x, [-1, 8]) -> Gemm / MatMul [+ b] -> Reshape back."""
    rng = np.random.default_rng(0)
    x = ir.val("x", FLOAT, [B, S, 8])
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 23}, name="conv1d")
    tape = ir.tape.Tape(graph)
    w = tape.initializer(ir.tensor(rng.standard_normal((8, 12)).astype(np.float32), name="w"))
    b = tape.initializer(ir.tensor(rng.standard_normal(12).astype(np.float32), name="b"))
    rows = tape.op("Reshape", [x, tape.initializer(ir.tensor(np.array([-1, 8], np.int64), name="rows"))])
    if gemm:
        product = tape.op("Gemm", [rows, w, b])
    else:
        product = tape.op("MatMul", [rows, w])
        product = tape.op("Add", [product, b]) if bias else product
    shape = tape.op("Shape", [x], {"start": 0, "end": 2})
    if restore == "swapped":  # [seq, batch]: the same element count, not x's leading dims
        shape = tape.op("Concat", [tape.op("Shape", [x], {"start": 1, "end": 2}),
                                   tape.op("Shape", [x], {"start": 0, "end": 1})], {"axis": 0})
    target = tape.op("Concat", [shape, tape.initializer(ir.tensor(np.array([12], np.int64), name="n"))], {"axis": 0})
    y = tape.op("Reshape", [product, target])
    y.name = "y"
    graph.outputs.append(y)
    return ir.Model(graph, ir_version=10)


def _outputs(model: ir.Model, rng: np.random.Generator) -> list[np.ndarray]:
    session = _session(model)
    return [session.run(None, {"x": rng.standard_normal((batch, seq, 8)).astype(np.float32)})[0]
            for batch, seq in ((2, 5), (3, 1))]


@pytest.mark.parametrize("gemm, bias", [(True, True), (False, True), (False, False)])
def test_flatten_matmul_unflatten_becomes_one_matmul(gemm, bias):
    model = _conv1d_model(gemm, bias)
    want = _outputs(model, np.random.default_rng(1))
    ShapeInferencePass()(model)
    assert prove_reshapes(model) == ReshapeProofs(dims=0, chains=1)
    counts = Counter(n.op_type for n in model.graph)
    assert counts["Reshape"] == 0 and counts["Gemm"] == 0 and counts["MatMul"] == 1, counts
    for got, expected in zip(_outputs(model, np.random.default_rng(1)), want):
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_an_unflatten_to_other_dims_is_left_alone():
    model = _conv1d_model(gemm=True, restore="swapped")
    ShapeInferencePass()(model)
    before = Counter(n.op_type for n in model.graph)
    assert prove_reshapes(model) == ReshapeProofs(dims=0, chains=0)
    assert Counter(n.op_type for n in model.graph) == before


def test_a_matmul_over_one_element_becomes_a_mul_for_tvm():
    """HF's rotary inv_freq [B, 8, 1] x positions [B, 1, S]: TVM's CPU GEMV schedule asserts on its one-element
    reduction, so the TVM lowering makes it the broadcast Mul it is (bit-equal: one product, no sum)."""
    from kvc.passes.lower_tvm_outer_products import LowerTvmOuterProductsPass

    freq, positions = ir.val("freq", FLOAT, [B, 8, 1]), ir.val("positions", FLOAT, [B, 1, S])
    graph = ir.Graph([freq, positions], [], nodes=[], opset_imports={"": 23}, name="outer")
    y = ir.tape.Tape(graph).op("MatMul", [freq, positions])
    y.name = "y"
    graph.outputs.append(y)
    model = ir.Model(graph, ir_version=10)
    rng = np.random.default_rng(3)
    feeds = {"freq": rng.standard_normal((2, 8, 1)).astype(np.float32),
             "positions": rng.standard_normal((2, 1, 5)).astype(np.float32)}
    want = _session(model).run(None, feeds)[0]
    LowerTvmOuterProductsPass()(model)
    assert [n.op_type for n in model.graph] == ["Mul"]
    np.testing.assert_array_equal(_session(model).run(None, feeds)[0], want)
