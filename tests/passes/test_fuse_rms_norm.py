"""RMSNorm fusion on small hand-written graphs: the variants exporters produce, and near misses."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from kvc.passes.fusion_pipeline import run_fusions

HEADER = '<ir_version: 10, opset_import: ["" : 23]>'
SQUARE = {"pow": "sq = Pow(xc, two)", "mul": "sq = Mul(xc, xc)"}
INVERSE = {"reciprocal": "inv = Reciprocal(rms)\n norm = Mul(xc, inv)",
           "div_one": "inv = Div(one, rms)\n norm = Mul(inv, xc)",
           "div": "norm = Div(xc, rms)"}


def rms_graph(square: str, inverse: str, *, axes: str = "[-1]", eps: bool = True, cast: bool = False,
              scale_first: bool = False, dtype: str = "float") -> str:
    """x [2, 3, 8] normalised over ``axes``; optional Cast to float and back around the statistics."""
    cast_in = "xc = Cast<to=1>(x)" if cast else "xc = Identity(x)"
    cast_out = f"normc = Cast<to={onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))}>(norm)" if cast \
        else "normc = Identity(norm)"
    add = "var = Add(ms, epsilon)" if eps else "var = Identity(ms)"
    scaled = "y = Mul(w, normc)" if scale_first else "y = Mul(normc, w)"
    return f"""{HEADER}
    g ({dtype}[2, 3, 8] x, {dtype}[8] w) => ({dtype}[2, 3, 8] y) {{
        two = Constant<value = float {{2.0}}>()
        one = Constant<value = float {{1.0}}>()
        epsilon = Constant<value = float {{1e-5}}>()
        axes = Constant<value = int64[{axes.count(',') + 1}] {{{axes[1:-1]}}}>()
        {cast_in}
        {SQUARE[square]}
        ms = ReduceMean<keepdims=1>(sq, axes)
        {add}
        rms = Sqrt(var)
        {INVERSE[inverse]}
        {cast_out}
        {scaled}
    }}"""


def fuse(text: str) -> tuple[ir.Model, onnx.ModelProto, dict]:
    proto = onnx.parser.parse_model(text)
    onnx.checker.check_model(proto)
    model = ir.from_proto(proto)
    reports = {r.name: r for r in run_fusions(model)}
    return model, proto, reports


def compare(kit, model, proto, dtype=np.float32, atol=None):
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((2, 3, 8)).astype(dtype), "w": (1 + rng.standard_normal(8) / 10).astype(dtype)}
    np.testing.assert_allclose(kit.run(model, feeds)[0].astype(np.float32), kit.run(proto, feeds)[0].astype(np.float32),
                               rtol=kit.rtol, atol=atol or kit.atol)


@pytest.mark.parametrize("square", sorted(SQUARE))
@pytest.mark.parametrize("inverse", sorted(INVERSE))
@pytest.mark.parametrize("scale_first", [False, True])
def test_variants_fuse_into_one_rms_normalization(kit, square, inverse, scale_first):
    model, proto, reports = fuse(rms_graph(square, inverse, scale_first=scale_first))
    assert kit.op_counts(model) == {"RMSNormalization": 1}
    (node,) = model.graph
    assert node.attributes["axis"].as_int() == 2
    assert node.attributes["epsilon"].as_float() == pytest.approx(1e-5)
    assert reports["rms_norm"].matched == 1
    compare(kit, model, proto)


def test_trailing_axes_give_the_first_normalized_axis(kit):
    model, proto, _ = fuse(rms_graph("mul", "div", axes="[1, 2]").replace("float[8] w", "float[3, 8] w"))
    (node,) = model.graph
    assert node.op_type == "RMSNormalization" and node.attributes["axis"].as_int() == 1
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((2, 3, 8)).astype(np.float32),
             "w": rng.standard_normal((3, 8)).astype(np.float32)}
    np.testing.assert_allclose(kit.run(model, feeds)[0], kit.run(proto, feeds)[0], rtol=kit.rtol, atol=kit.atol)


def test_half_precision_with_float_statistics(kit):
    model, proto, _ = fuse(rms_graph("pow", "reciprocal", cast=True, dtype="float16"))
    (node,) = model.graph
    assert node.op_type == "RMSNormalization" and node.attributes["stash_type"].as_int() == onnx.TensorProto.FLOAT
    compare(kit, model, proto, dtype=np.float16, atol=2e-3)  # fp16 output rounding


def test_without_epsilon_it_is_not_rms_norm(kit):
    model, proto, reports = fuse(rms_graph("pow", "reciprocal", eps=False))
    assert kit.op_counts(model)["RMSNormalization"] == 0 and kit.op_counts(model)["ReduceMean"] == 1
    assert reports["rms_norm"].notes == [
        "rms_norm: 1 ReduceMean(x^2) nodes not fused: no epsilon is added to the mean of squares"]
    compare(kit, model, proto)


def test_mean_over_a_leading_axis_is_not_fused(kit):
    model, proto, reports = fuse(rms_graph("mul", "div", axes="[0]").replace("float[8] w", "float[3, 8] w"))
    assert kit.op_counts(model)["RMSNormalization"] == 0
    assert reports["rms_norm"].notes == [
        "rms_norm: 1 ReduceMean(x^2) nodes not fused: ReduceMean does not reduce the trailing axes with keepdims=1"]
