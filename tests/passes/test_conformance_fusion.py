"""ONNX's own node conformance cases for Attention, RotaryEmbedding and RMSNormalization, in their
function-expanded form (``*_expanded``: the op's function body inlined, dozens of nodes): the passes
must fuse each back into the single op and still produce the case's expected outputs, checked in
ONNX Runtime CPU against both the expected outputs and the unfused graph."""
from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from kvc.passes.fusion_pipeline import run_fusions

FUSED_OP = {"test_attention": "Attention", "test_rotary_embedding": "RotaryEmbedding",
            "test_rms_normalization": "RMSNormalization"}
# ONNX Runtime 1.31 CPU has no bfloat16 kernels for these graphs, fused (Attention) or not
# (Mul / Add / Expand / Pad): nothing to compare against.
UNSUPPORTED_DTYPES = {onnx.TensorProto.BFLOAT16: "ONNX Runtime CPU has no bfloat16 kernels for this graph"}
TOLERANCE = {np.dtype(np.float16): dict(rtol=1e-3, atol=2e-3)}  # fp16 rounding; fp32 uses the kit's


@functools.lru_cache(maxsize=1)
def expanded_cases() -> dict[str, object]:
    from onnx.backend.test.loader import load_model_tests

    with np.errstate(all="ignore"):  # generating unrelated node cases warns about overflows
        cases = load_model_tests(kind="node")
    return {c.name: c for c in cases if c.name.startswith(tuple(FUSED_OP)) and c.name.endswith("_expanded")}


def fused_op(name: str) -> str:
    return next(op for prefix, op in FUSED_OP.items() if name.startswith(prefix))


def unsupported_dtype(model: onnx.ModelProto) -> str | None:
    for value in model.graph.input:
        if value.type.tensor_type.elem_type in UNSUPPORTED_DTYPES:
            return UNSUPPORTED_DTYPES[value.type.tensor_type.elem_type]
    return None


def test_the_expanded_cases_are_all_there():
    names = expanded_cases()
    per_op = {op: sum(fused_op(n) == op for n in names) for op in FUSED_OP.values()}
    assert per_op["Attention"] >= 90 and per_op["RotaryEmbedding"] >= 8 and per_op["RMSNormalization"] >= 19, per_op


@pytest.mark.parametrize("name", sorted(expanded_cases()))
def test_expanded_case_is_fused_back_into_one_op(kit, name):
    case = expanded_cases()[name]
    inputs, expected = case.data_sets[0]
    feeds = {v.name: array for v, array in zip(case.model.graph.input, inputs)}
    reason = unsupported_dtype(case.model)
    if reason:
        with pytest.raises(Exception):  # the skip is only honest while ONNX Runtime really cannot run it
            kit.run(case.model, feeds)
        pytest.skip(reason)

    model = ir.from_proto(case.model)
    reports = run_fusions(model)
    counts = kit.op_counts(model)
    op = fused_op(name)
    assert counts[op] == 1, (counts, [n for r in reports for n in r.notes])
    if op == "Attention":  # what remains computes the mask or 3-D <-> 4-D reshapes
        assert not {"Softmax", "MatMul"} & set(counts), counts
    else:
        assert counts == {op: 1}, counts

    got, before = kit.run(model, feeds), kit.run(case.model, feeds)
    for i, (want, unfused, actual) in enumerate(zip(expected, before, got)):
        tolerance = TOLERANCE.get(actual.dtype, dict(rtol=kit.rtol, atol=kit.atol))
        np.testing.assert_allclose(actual, want, err_msg=f"output {i} vs expected", **tolerance)
        np.testing.assert_allclose(actual, unfused, err_msg=f"output {i} vs unfused", **tolerance)
