"""`kvc compile --weights`: every weight precision on both engines against a reference of the same
scheme: the fp32 export with each weight replaced by its decoded stored form (numpy codec, checked
against a per-block loop in tests/passes/test_weight_quantize.py), compiled fp32 on the ORT engine.
Prefill + decode logits must agree tightly: the only difference left is summation order."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx_ir as ir
import pytest

from kvc.contract import MANIFEST_FILE, WeightDtype
from kvc.passes.weight_quantize import WeightQuantOptions, decode_weights_in_place
from kvc.runtime import load
from tests.compiler.test_tvm_engine import logits_trace

PROMPT = [3, 14, 15, 92, 65, 35]
TOKENS = [89, 79, 32, 38, 46, 26, 43, 38, 32, 79, 50, 28]
CAPACITY = 64
TOLERANCE = 2e-4  # fp32 sums in another order (MatMulNBits, TVM's schedules)


def same_scheme_export(onnx_path, out_dir, options: WeightQuantOptions):
    """The fp32 export with every weight the scheme stores replaced by its decoded values."""
    model = ir.load(onnx_path)
    decode_weights_in_place(model, options)
    out_dir.mkdir(parents=True)
    path = out_dir / "model.onnx"
    ir.save(model, path)
    return path


def compile_to(onnx_path, out, engine="ort", options: WeightQuantOptions = WeightQuantOptions()):
    from kvc.compiler.options import CompileOptions
    from kvc.compiler.pipeline import compile_model

    compile_model(onnx_path, out, CompileOptions(engine=engine, max_seq_len=CAPACITY, weights=options.dtype,
                                                 weight_block=options.block_size,
                                                 weight_symmetric=options.symmetric), progress=lambda *_: None)
    return out


CASES = {
    "fp16": WeightQuantOptions(WeightDtype.FP16),
    "bf16": WeightQuantOptions(WeightDtype.BF16),
    "int8": WeightQuantOptions(WeightDtype.INT8, block_size=32),
    "int8-asym-64": WeightQuantOptions(WeightDtype.INT8, block_size=64, symmetric=False),
    "int4": WeightQuantOptions(WeightDtype.INT4, block_size=32),
    "int4-asym-128": WeightQuantOptions(WeightDtype.INT4, block_size=128, symmetric=False),
}
TVM_CASES = ["fp16", "bf16", "int4", "int4-asym-128"]  # TVM builds cost ~25 s each on the loaded 2-core machine


@pytest.fixture(scope="module")
def references(exported, tmp_path_factory):
    cache = {}

    def make(case: str):
        if case not in cache:
            root = tmp_path_factory.mktemp(f"ref-{case}")
            path = same_scheme_export(exported("tiny")[2], root / "export", CASES[case])
            cache[case] = load(compile_to(path, root / "ref.kvc"))
        return cache[case]

    return make


def worst_difference(model, reference) -> float:
    return max(float(np.abs(a - b).max()) for a, b in
               zip(logits_trace(model, PROMPT, TOKENS), logits_trace(reference, PROMPT, TOKENS)))


@pytest.mark.parametrize("case", list(CASES))
def test_ort_engine_equals_the_same_scheme_reference(case, exported, references, tmp_path):
    artifact = compile_to(exported("tiny")[2], tmp_path / "q.kvc", "ort", CASES[case])
    worst = worst_difference(load(artifact), references(case))
    assert worst <= TOLERANCE, f"{case}: max |ort - reference| = {worst:.2e}"
    manifest = json.loads((artifact / MANIFEST_FILE).read_text())
    passes = {p["name"]: p for p in manifest["passes"]}
    assert passes["weight_quantize"]["matched"] > 0
    if CASES[case].dtype.quantized:
        assert passes["lower_ort_matmul_nbits"]["matched"] > 0


@pytest.mark.parametrize("case", TVM_CASES)
def test_tvm_engine_equals_the_same_scheme_reference(case, exported, references, tmp_path):
    artifact = compile_to(exported("tiny")[2], tmp_path / "q.kvc", "tvm", CASES[case])
    worst = worst_difference(load(artifact), references(case))
    assert worst <= TOLERANCE, f"{case}: max |tvm - reference| = {worst:.2e}"
    if case in ("fp16", "bf16"):  # the weight matmuls read the half-width weights themselves, packed
        from safetensors import safe_open

        with safe_open(str(artifact / "params.safetensors"), "np") as params:
            stored = {name: params.get_slice(name).get_dtype() for name in params.keys() if name.endswith(".packed")}
        assert len(stored) >= 7 and set(stored.values()) == {"F16" if case == "fp16" else "BF16"}, stored


def test_the_reference_is_not_the_fp32_model(exported, references, compiled):
    """The schemes really change the logits (else the tests above could not fail)."""
    fp32 = load(compiled("tiny", capacity=CAPACITY))
    assert worst_difference(fp32, references("int4")) > 10 * TOLERANCE
    assert worst_difference(fp32, references("fp16")) > 0


def initializer_bytes(artifact) -> dict[str, int]:
    import onnx

    graph = onnx.load(str(artifact / "graph.onnx")).graph
    return {t.name: onnx.numpy_helper.to_array(t).nbytes for t in graph.initializer}


def test_stored_weight_bytes_shrink_with_the_precision(exported, tmp_path):
    """Bytes of the weights as stored (what the initializers common to every precision, e.g. RoPE
    tables and norms, do not include): scales cost 4 bytes per block of 32."""
    stored = {}
    for name in ("fp32", "fp16", "int8", "int4"):
        out = compile_to(exported("tiny")[2], tmp_path / f"{name}.kvc", "ort", WeightQuantOptions(WeightDtype(name)))
        stored[name] = initializer_bytes(out)
        shutil.rmtree(out)
    common = set.intersection(*(set(s) for s in stored.values()))
    weights = {name: sum(v for k, v in s.items() if k not in common) for name, s in stored.items()}
    assert weights["fp16"] == pytest.approx(weights["fp32"] / 2, rel=0.01)
    assert weights["int8"] <= weights["fp32"] * (1 + 4 / 32) / 4 * 1.05
    assert weights["int4"] <= weights["fp32"] * (0.5 + 4 / 32) / 4 * 1.05
