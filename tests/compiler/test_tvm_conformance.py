"""ONNX's node conformance cases through kvc.compiler.tvm.from_onnx, built for llvm and run on the relax VM.

Cases: every non-expanded (single fused node) case of Attention (opsets 23-25), RotaryEmbedding,
RMSNormalization, TensorScatter, and of QuantizeLinear / DequantizeLinear / Cast where float8 or the
blocked form is involved (kvc's quantized caches), compared with the case's expected outputs:
  float32           rtol 1e-3, atol 1e-4
  float16           rtol/atol 2e-3: two float16 ulps near 1 (eps 9.8e-4); TVM accumulates in another order
  bfloat16          rtol/atol 1.6e-2: two bfloat16 ulps near 1 (eps 7.8e-3)
  integer / float8  bit for bit
"""
from __future__ import annotations

import numpy as np
import pytest

from tvm_case_helpers import as_numpy, load_node_cases, run_vm

FUSED_PREFIXES = ("test_attention", "test_rotary_embedding", "test_rms_normalization", "test_tensorscatter")
QDQ_PREFIXES = ("test_quantizelinear", "test_dequantizelinear")
FLOAT8_CAST = ("E4M3FN", "E5M2")

EXCLUDED = {  # name part -> why
    "int4": "4-bit integer types are not lowered (no packed sub-byte tensors in kvc's TVM path)",
    "uint4": "4-bit integer types are not lowered (no packed sub-byte tensors in kvc's TVM path)",
    "int2": "2-bit integer types are not lowered (no packed sub-byte tensors in kvc's TVM path)",
    "uint2": "2-bit integer types are not lowered (no packed sub-byte tensors in kvc's TVM path)",
    "float4e2m1": "float4 is not lowered (no packed sub-byte tensors in kvc's TVM path)",
}
TOLERANCE = {"float32": (1e-3, 1e-4), "float16": (2e-3, 2e-3), "bfloat16": (1.6e-2, 1.6e-2)}


def _selected(name: str) -> bool:
    if "_expanded" in name:
        return False
    if name.startswith(FUSED_PREFIXES + QDQ_PREFIXES):
        return True
    return name.startswith("test_cast_") and any(f in name for f in FLOAT8_CAST) and "FNUZ" not in name


CASES = load_node_cases()
NAMES = sorted(name for name in CASES if _selected(name))


def _exclusion(name: str) -> str | None:
    for part, reason in EXCLUDED.items():
        if name.endswith(f"_{part}"):
            return reason
    return None


def test_case_selection_covers_each_op():
    """Guard against a silently empty parametrization (e.g. renamed onnx case modules)."""
    for prefix in FUSED_PREFIXES + QDQ_PREFIXES + ("test_cast_",):
        assert any(n.startswith(prefix) for n in NAMES), prefix
    assert len(NAMES) >= 140


@pytest.mark.parametrize("name", NAMES)
def test_node_case(name, llvm_fast):
    from kvc.compiler.tvm.onnx_import import from_onnx
    from kvc.compiler.tvm.target import build

    reason = _exclusion(name)
    if reason:
        pytest.skip(reason)
    case = CASES[name]
    inputs, expected = case.data_sets[0]
    mod = from_onnx(case.model)
    got = run_vm(build(mod, llvm_fast), [as_numpy(a) for a in inputs])
    assert len(got) == len(expected)
    for actual, want in zip(got, expected):
        _assert_matches(actual, as_numpy(want))


def _assert_matches(actual: np.ndarray, want: np.ndarray) -> None:
    assert actual.shape == want.shape
    assert str(actual.dtype) == str(want.dtype)
    dtype = str(want.dtype)
    if dtype in TOLERANCE:
        rtol, atol = TOLERANCE[dtype]
        np.testing.assert_allclose(actual.astype(np.float64), want.astype(np.float64), rtol=rtol, atol=atol)
    elif dtype.startswith("float8"):
        same = actual.view(np.uint8) == want.view(np.uint8)
        both_nan = np.isnan(actual.astype(np.float32)) & np.isnan(want.astype(np.float32))
        assert np.all(same | both_nan), (actual, want)
    else:
        np.testing.assert_array_equal(actual, want)
