"""The ORT engine's device-resident path (kvc.runtime.ort_device), run here against CPU memory: caches
allocated once and bound by address (rows by offset), only logits copied back, row copies for the
prefix cache. Its results must equal the host path's exactly (same session, same kernels). On CUDA the
same code binds device memory; tests/gpu/test_cuda_parity.py checks that on a GPU. Also: --device cuda
on a machine without a GPU is refused in one line, before ONNX Runtime's CUDA provider is requested."""
from __future__ import annotations

import numpy as np
import pytest

from kvc.errors import KvcError
from kvc.runtime import load
from kvc.runtime.ort_device import OrtPlace, cuda_device_count
from kvc.runtime.ort_engine import providers_for
from kvc.runtime.sampling import SamplingParams


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True)


def _steps(engine, rng, batch: int, prompt_len: int, decode: int) -> list[np.ndarray]:
    """Prefill rows of different lengths, then decode steps; every step's logits."""
    logits = []
    lengths = rng.integers(prompt_len // 2, prompt_len + 1, batch)
    for row in reversed(range(batch)):  # one row per call (rows of different lengths); row 0 last
        length = lengths[row]
        ids = rng.integers(1, engine.vocab_size, (1, int(length)))
        # the other rows are untouched: batch-1 calls write row 0 only, so write through read/write_slots
        logits.append(engine.forward(ids, np.arange(length)[None], np.zeros(1, np.int64)))
        if row:
            engine.write_slots(row, engine.read_slots(0, int(length)))
    past = lengths.astype(np.int64)
    for _ in range(decode):
        ids = rng.integers(1, engine.vocab_size, (batch, 1))
        logits.append(engine.forward(ids, past[:, None].copy(), past.copy()))
        past += 1
    return logits


@pytest.mark.parametrize("kv_dtype,fixed_decode_buffers", [("fp32", False), ("fp16", False), ("int8", True),
                                                            ("fp8", True)])
def test_device_binding_equals_the_host_path(compiled, kv_dtype, fixed_decode_buffers):
    """fixed_decode_buffers: decode steps run as a CUDA graph would (inputs and logits in fixed buffers
    updated in place, a graph id per batch size, which the CPU provider ignores)."""
    artifact = compiled("tiny", kv_dtype=kv_dtype, capacity=64)
    host = load(artifact, max_batch=3).engine
    device = load(artifact, max_batch=3).engine
    device.use_device_binding(OrtPlace("cpu"), cuda_graph=fixed_decode_buffers)
    assert device.device_binding is not None and not device.caches and device.slots == device.capacity
    a = _steps(host, np.random.default_rng(7), batch=3, prompt_len=20, decode=6)
    b = _steps(device, np.random.default_rng(7), batch=3, prompt_len=20, decode=6)
    for step, (x, y) in enumerate(zip(a, b)):
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-5, err_msg=f"step {step}")
    # the cache contents are equal too (row copies go through the one-node Identity session)
    for row in range(3):
        for x, y in zip(host.read_slots(row, 20), device.read_slots(row, 20)):
            np.testing.assert_array_equal(y, x)


def test_device_buffers_are_allocated_once_and_bound_in_place(compiled):
    engine = load(compiled("tiny", capacity=64), max_batch=2).engine
    engine.use_device_binding(OrtPlace("cpu"))
    buffers = engine.device_binding.buffers
    addresses = {name: b.address() for name, b in buffers.items()}
    first = next(iter(buffers))
    before = engine.device_binding.read_row(first, 1, 64)
    engine.forward(np.array([[5, 6, 7]]), np.arange(3)[None], np.zeros(1, np.int64))  # row 0 only
    assert {name: b.address() for name, b in buffers.items()} == addresses
    after0 = engine.device_binding.read_row(first, 0, 64)
    assert np.abs(after0[:, :3]).sum() > 0 and not after0[:, 3:].any()  # written in place, 3 slots
    np.testing.assert_array_equal(engine.device_binding.read_row(first, 1, 64), before)  # row 1 untouched
    assert engine.cache_nbytes() == sum(b.row_bytes * 2 for b in buffers.values())


def test_generation_with_the_device_binding_equals_the_host_path(compiled):
    artifact = compiled("tiny", kv_dtype="int8", capacity=64)
    host = load(artifact)
    device = load(artifact)
    device.engine.use_device_binding(OrtPlace("cpu"))
    prompt = [3, 14, 15, 92, 65, 35]
    assert device.generate(prompt, greedy(70)).token_ids == host.generate(prompt, greedy(70)).token_ids  # wraps


def test_write_slots_checks_the_row(compiled):
    engine = load(compiled("tiny", capacity=64)).engine
    engine.use_device_binding(OrtPlace("cpu"))
    with pytest.raises(ValueError, match="outside the cache"):
        engine.read_slots(1, 4)


@pytest.mark.skipif(cuda_device_count() > 0, reason="a CUDA device is present: the refusal cannot be reached")
def test_cuda_is_refused_in_one_line_before_the_provider_is_requested(capfd):
    with pytest.raises(KvcError) as error:
        providers_for("cuda")
    message = str(error.value)
    assert "\n" not in message and "no usable CUDA device" in message and "--device cpu" in message
    assert capfd.readouterr().err == ""  # ONNX Runtime's CUDA provider was never asked to start
