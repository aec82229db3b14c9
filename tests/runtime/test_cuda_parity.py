"""Both CUDA engines against the CPU ORT engine (marked gpu: skipped without an NVIDIA GPU; run by
benchmarks/gpu_check.sh).

For fp32 / fp16 / int8 / fp8 caches with fp32 weights, and fp16 / int4 weights (int8 and fp32 caches):
the same seeded prompt crossing the ring's wrap, fed token by token (teacher forcing, so a near-tie
cannot make the runs diverge), then a two-row decode; every step's logits compared with the CPU ORT
engine of the same compile options. Tolerance: 2e-2 x max(1, |logits|) (TF32/fp16 GPU matmuls, a
quantized code that rounds the other way), and the greedy choice equal wherever the reference's top-2
margin exceeds twice the tolerance.
The TVM CUDA artifact is compiled with the check against the original graph on (it runs on this GPU).
"""
from __future__ import annotations

import numpy as np
import pytest

from kvc.runtime import load

pytestmark = pytest.mark.gpu

CAPACITY = 48
PROMPT, DECODE = 30, 30  # 60 tokens > 48 slots: decode crosses the ring's wrap
CASES = [("fp32", "fp32"), ("fp16", "fp32"), ("int8", "fp32"), ("fp8", "fp32"), ("fp32", "fp16"), ("int8", "int4")]


@pytest.fixture(scope="module")
def artifacts(exported, tmp_path_factory):
    """(engine, target, kv_dtype, weights) -> artifact directory, compiled once per module."""
    from kvc.compiler.options import CompileOptions, Device, EngineKind
    from kvc.compiler.pipeline import compile_model

    cache = {}

    def make(engine: str, device: str, kv_dtype: str, weights: str):
        key = (engine, device, kv_dtype, weights)
        if key not in cache:
            _, _, onnx_path = exported("tiny")
            out = tmp_path_factory.mktemp("cuda") / f"{engine}-{device}-{kv_dtype}-{weights}.kvc"
            compile_model(onnx_path, out, CompileOptions(engine=EngineKind(engine), device=Device(device),
                                                         max_seq_len=CAPACITY, kv_dtype=kv_dtype, weights=weights),
                          progress=lambda *_: None)
            cache[key] = out
        return cache[key]

    return make


def _run(engine) -> list[np.ndarray]:
    """Every step's logits: a prompt on row 0, single tokens past the wrap, then rows 0 and 1 together."""
    rng = np.random.default_rng(2026)
    prompt = rng.integers(1, engine.vocab_size, (1, PROMPT))
    steps = [engine.forward(prompt, np.arange(PROMPT)[None], np.zeros(1, np.int64))]
    engine.write_slots(1, engine.read_slots(0, PROMPT))  # row 1: the same prefix (read/write on the device)
    for i in range(DECODE):
        pos = PROMPT + i
        token = rng.integers(1, engine.vocab_size, (1, 1))
        steps.append(engine.forward(token, np.array([[pos]]), np.array([pos], np.int64)))
    both = rng.integers(1, engine.vocab_size, (2, 1))
    past = np.array([PROMPT + DECODE, PROMPT], np.int64)
    steps.append(engine.forward(both, past[:, None].copy(), past))
    return steps


def _compare(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want)):
        g, w = g.astype(np.float64), w.astype(np.float64)
        tol = 2e-2 * max(1.0, float(np.abs(w).max()))
        np.testing.assert_allclose(g, w, rtol=0, atol=tol, err_msg=f"step {step}")
        top2 = np.sort(w, axis=-1)[..., -2:]
        clear = (top2[..., 1] - top2[..., 0]) > 2 * tol
        assert np.array_equal(g.argmax(-1)[clear], w.argmax(-1)[clear]), f"step {step}: greedy token differs"


@pytest.fixture(scope="module")
def reference(artifacts):
    cache = {}

    def make(kv_dtype: str, weights: str) -> list[np.ndarray]:
        if (kv_dtype, weights) not in cache:
            cache[kv_dtype, weights] = _run(load(artifacts("ort", "cpu", kv_dtype, weights), max_batch=2).engine)
        return cache[kv_dtype, weights]

    return make


@pytest.mark.parametrize("kv_dtype,weights", CASES)
def test_ort_cuda_engine_equals_the_cpu_engine(kv_dtype, weights, artifacts, reference):
    model = load(artifacts("ort", "cpu", kv_dtype, weights), max_batch=2, device="cuda")
    binding = model.engine.device_binding
    assert binding is not None and binding.place.kind == "cuda"
    assert "CUDAExecutionProvider" in model.engine.session.get_providers()
    _compare(_run(model.engine), reference(kv_dtype, weights))
    print(f"ORT CUDA {kv_dtype}/{weights}: CUDA graphs {'on' if binding.cuda_graph else 'off (graph not all on CUDA)'}")


@pytest.mark.parametrize("kv_dtype,weights", CASES)
def test_tvm_cuda_engine_equals_the_cpu_ort_engine(kv_dtype, weights, artifacts, reference):
    model = load(artifacts("tvm", "cuda", kv_dtype, weights), max_batch=2, device="cuda")
    assert model.engine.device.device_type == 2  # kDLCUDA
    _compare(_run(model.engine), reference(kv_dtype, weights))

