"""weight_quantize (neutral) and lower_ort_matmul_nbits: the codec against a per-block loop written
from the definition, the pass's graph (onnx ReferenceEvaluator and ORT) against numpy with the same
dequantized weights (tight), and the ORT lowering (MatMulNBits / GatherBlockQuantized) against the
graph before it (tight)."""
from __future__ import annotations

import numpy as np
import onnx
import onnx.reference
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from kvc.contract import WeightDtype
from kvc.errors import KvcError
from kvc.passes.lower_ort_matmul_nbits import LowerOrtMatMulNBitsPass
from kvc.passes.weight_quantize import (WeightQuantizePass, WeightQuantOptions,
                                        dequantize_blocks, quantize_blocks)

SCHEMES = [(WeightDtype.INT8, True), (WeightDtype.INT8, False), (WeightDtype.INT4, True), (WeightDtype.INT4, False)]


def loop_reference(w: np.ndarray, bits: int, block: int, symmetric: bool) -> np.ndarray:
    """Quantize-dequantize [K, N] one block of K at a time, written from the scheme's definition."""
    out = np.empty_like(w)
    for start in range(0, w.shape[0], block):
        for n in range(w.shape[1]):
            x = w[start:start + block, n].astype(np.float64)
            if symmetric:
                qmax = 2 ** (bits - 1) - 1
                scale = np.float32(np.abs(x).max() / qmax) or np.float32(1)
                q = np.clip(np.rint(x / scale), -qmax, qmax)
                out[start:start + block, n] = q * scale
            else:
                qmax = 2 ** bits - 1
                low, high = min(x.min(), 0.0), max(x.max(), 0.0)
                scale = np.float32((high - low) / qmax) or np.float32(1)
                zp = np.clip(np.rint(-low / scale), 0, qmax)
                q = np.clip(np.rint(x / scale) + zp, 0, qmax)
                out[start:start + block, n] = (q - zp) * scale
    return out


@pytest.mark.parametrize("dtype,symmetric", SCHEMES)
@pytest.mark.parametrize("block", [32, 64])
def test_codec_matches_the_per_block_definition(dtype, symmetric, block):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((block * 3 + 16, 5)).astype(np.float32)  # a partial last block
    w[:block, 0] = 0.0  # an all-zero block
    q = quantize_blocks(w, dtype.bits, block, symmetric, axis=0)
    assert q.scale.shape == (4, 5)
    got = dequantize_blocks(q, block, axis=0)
    np.testing.assert_allclose(got, loop_reference(w, dtype.bits, block, symmetric), rtol=0, atol=1e-6)
    step = q.scale.repeat(block, 0)[: w.shape[0]]
    assert np.all(np.abs(got - w) <= 0.5 * step + 1e-6)  # within half a step of the original
    assert np.all(got[:block, 0] == 0.0)


def test_codec_along_axis_1_is_the_transpose():
    w = np.random.default_rng(1).standard_normal((40, 96)).astype(np.float32)
    rows = quantize_blocks(w, 4, 32, True, axis=1)
    cols = quantize_blocks(w.T, 4, 32, True, axis=0)
    np.testing.assert_array_equal(rows.codes.astype(np.int8), cols.codes.T.astype(np.int8))
    np.testing.assert_array_equal(dequantize_blocks(rows, 32, axis=1), dequantize_blocks(cols, 32, axis=0).T)


def test_unsupported_block_is_refused():
    with pytest.raises(KvcError, match="--weight-block 48"):
        WeightQuantOptions(WeightDtype.INT4, block_size=48)


# --- a small graph: embedding Gather, two projections, a tied lm_head --------------------------
V, H, F = 48, 64, 96


def small_model(rng) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    weights = {"embed": rng.standard_normal((V, H)).astype(np.float32),
               "up": rng.standard_normal((H, F)).astype(np.float32) * 0.2,
               "down": rng.standard_normal((F, H)).astype(np.float32) * 0.2}
    weights["lm_head"] = weights["embed"].T.copy()
    nodes = [helper.make_node("Gather", ["embed", "ids"], ["x"], axis=0),
             helper.make_node("MatMul", ["x", "up"], ["u"]),
             helper.make_node("Relu", ["u"], ["r"]),
             helper.make_node("MatMul", ["r", "down"], ["d"]),
             helper.make_node("Add", ["x", "d"], ["h"]),
             helper.make_node("MatMul", ["h", "lm_head"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "s", V])],
                              [onnx.numpy_helper.from_array(a, n) for n, a in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10), weights


def numpy_forward(weights: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    x = weights["embed"][ids]
    h = x + np.maximum(x @ weights["up"], 0) @ weights["down"]
    return h @ weights["embed"].T


def same_scheme_weights(weights, options: WeightQuantOptions) -> dict[str, np.ndarray]:
    """Each weight as the scheme stores it, decoded: blocks along K for matmuls, along H for the table."""
    if not options.dtype.quantized:
        half = np.float16 if options.dtype is WeightDtype.FP16 else __import__("ml_dtypes").bfloat16
        return {n: w.astype(half).astype(np.float32) for n, w in weights.items()}
    qd = lambda w, axis: dequantize_blocks(quantize_blocks(w, options.dtype.bits, options.block_size,  # noqa: E731
                                                           options.symmetric, axis), options.block_size, axis)
    return {"embed": qd(weights["embed"], 1), "up": qd(weights["up"], 0), "down": qd(weights["down"], 0)}


def quantized(proto: onnx.ModelProto, options: WeightQuantOptions, lower: bool) -> tuple[onnx.ModelProto, list]:
    model = ir.from_proto(proto)
    quant = WeightQuantizePass(options)
    quant(model)
    reports = [quant.report]
    if lower:
        lowering = LowerOrtMatMulNBitsPass()
        lowering(model)
        reports.append(lowering.report)
    return ir.to_proto(model), reports


def ort_run(proto: onnx.ModelProto, ids: np.ndarray, fuse: bool = True) -> np.ndarray:
    """ORT on CPU. Its extended optimizations fuse DequantizeLinear + MatMul into a MatMulNBits with
    accuracy_level 4 (int8 activations: ~1e-1 off here), so the standard graph runs with basic ones."""
    options = ort.SessionOptions()
    if not fuse:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"ids": ids})[0]


ALL_OPTIONS = [WeightQuantOptions(WeightDtype.FP16), WeightQuantOptions(WeightDtype.BF16)] + [
    WeightQuantOptions(d, block, s) for d, s in SCHEMES for block in (32, 64)]


@pytest.mark.parametrize("options", ALL_OPTIONS, ids=lambda o: f"{o.dtype.value}-{o.block_size}-{o.symmetric}")
def test_pass_graph_equals_numpy_with_the_same_scheme(options):
    rng = np.random.default_rng(2)
    proto, weights = small_model(rng)
    ids = rng.integers(0, V, size=(1, 7))
    expected = numpy_forward(same_scheme_weights(weights, options), ids)
    graph, reports = quantized(proto, options, lower=False)
    assert reports[0].matched == 4  # table, up, down, tied lm_head
    names = {i.name for i in graph.graph.initializer}
    assert "lm_head" not in names and "embed" not in names  # the table is stored once, quantized
    if options.dtype is not WeightDtype.BF16:  # ReferenceEvaluator: no bf16 Cast on this onnx
        ref = onnx.reference.ReferenceEvaluator(graph).run(None, {"ids": ids})[0]
        np.testing.assert_allclose(ref, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ort_run(graph, ids, fuse=False), expected, rtol=1e-4, atol=1e-4)
    drift = np.abs(expected - numpy_forward(weights, ids)).max()
    assert drift > 0  # the scheme really changed the weights


@pytest.mark.parametrize("options", [o for o in ALL_OPTIONS if o.dtype.quantized],
                         ids=lambda o: f"{o.dtype.value}-{o.block_size}-{o.symmetric}")
def test_ort_lowering_to_matmul_nbits_equals_numpy_with_the_same_scheme(options):
    rng = np.random.default_rng(3)
    proto, weights = small_model(rng)
    ids = rng.integers(0, V, size=(1, 5))
    expected = numpy_forward(same_scheme_weights(weights, options), ids)
    lowered, reports = quantized(proto, options, lower=True)
    ops = [n.op_type for n in lowered.graph.node]
    assert ops.count("MatMulNBits") == 3, ops
    assert ops.count("GatherBlockQuantized") == 1 and "DequantizeLinear" not in ops
    assert "Transpose" not in ops  # the tied lm_head reads the table's codes as they are
    codes = [i for i in lowered.graph.initializer if i.name.endswith(".nbits")]
    assert len(codes) == 3  # up, down and the table, which the lm_head and the Gather share
    np.testing.assert_allclose(ort_run(lowered, ids), expected, rtol=1e-4, atol=1e-4)


def test_lowering_pads_a_partial_last_block():
    w = np.random.default_rng(4).standard_normal((40, 8)).astype(np.float32)  # K = 40: not whole blocks of 32
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 40])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
                              [onnx.numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)
    x = np.random.default_rng(5).standard_normal((2, 40)).astype(np.float32)
    for symmetric in (True, False):
        lowered, reports = quantized(proto, WeightQuantOptions(WeightDtype.INT4, symmetric=symmetric), lower=True)
        assert reports[1].matched == 1
        expected = x @ dequantize_blocks(quantize_blocks(w, 4, 32, symmetric, axis=0), 32, axis=0)
        got = ort.InferenceSession(lowered.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
