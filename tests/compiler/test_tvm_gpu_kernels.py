"""kvc's GPU attention kernels (kvc.compiler.tvm.kernels.gpu_attention) without a GPU:

* emulated: the same TIR with the thread loops serial and the shared tiles in ordinary memory, built
  for llvm and run on the cases, poisoned slots and float64 numpy references of test_tvm_kernels.py
  (fp32 / fp16 / int8 / fp8 caches, masks, sequences that see nothing, lengths past the capacity), with
  the GPU's 128 threads and with 32 (more work per thread than one pass covers);
* built for CUDA (nvcc / NVRTC code generation only): every case compiles to one CUDA kernel per TIR
  function with barriers between the phases and its tiles in shared memory.
Running them on a GPU is tests/gpu/test_cuda_parity.py (marked gpu).
"""
from __future__ import annotations

import numpy as np
import pytest

import test_tvm_kernels as cases
from tvm_case_helpers import call_vm, load_vm

CAPACITY, LENGTHS = cases.CAPACITY, cases.LENGTHS


def _module(kind: str, spec, launch):
    """Relax module `main` calling the GPU kernel(s) of ``kind`` ("decode" | "prefill") for ``spec``."""
    import tvm

    from kvc.compiler.tvm.kernels import gpu_attention

    seq = 1 if kind == "decode" else tvm.tirx.Var("seq", "int64")
    emit = gpu_attention.emit_gpu_decode_attention if kind == "decode" else gpu_attention.emit_gpu_prefill_attention
    return cases.attention_module(spec, seq, lambda bb, *args: emit(bb, spec, *args, launch=launch))


def _decode_specs() -> dict:
    from kvc.compiler.tvm.kernels.gpu_attention import gpu_decode_spec

    specs = cases._specs()
    # as the converter makes them: a chunk that fits shared memory, 32 parts (most empty here)
    specs["int8-per-token-mask-gpu-defaults"] = gpu_decode_spec(specs["int8-per-token-mask"])
    return specs


def _feeds(kind: str, spec, rng, seq: int = 1):
    """(inputs, float64 reference) on test_tvm_kernels' poisoned caches."""
    batch, K, D = len(LENGTHS), spec.num_kv_heads, spec.head_dim
    q = rng.standard_normal((batch, spec.num_heads, seq, D)).astype(spec.query_dtype)
    k_stored, k_scale, k = cases._quantize(rng.standard_normal((batch, K, CAPACITY, D)).astype(np.float32), spec, rng)
    v_stored, v_scale, v = cases._quantize(rng.standard_normal((batch, K, CAPACITY, D)).astype(np.float32), spec, rng)
    mask = None
    if spec.has_mask:
        mask = rng.standard_normal((batch, 1, seq, CAPACITY)).astype(np.float32)
        mask[0, 0, :, [2, 5]] = -np.inf  # masked slots inside the valid range
        mask[3, 0, 0, :] = -np.inf  # a query that sees nothing: zeros
        for b, length in enumerate(LENGTHS):
            mask[b, 0, :, length:] = np.nan
    reference = cases._reference if kind == "decode" else cases._prefill_reference
    want = reference(q, k, v, mask, spec)
    for stored, scale in ((k_stored, k_scale), (v_stored, v_scale)):
        cases._poison(stored, scale, spec)
    feeds = [q, k_stored, v_stored, LENGTHS] + ([k_scale, v_scale] if k_scale is not None else [])
    return feeds + ([mask] if mask is not None else []), want


def _run_emulated(mod):
    from kvc.compiler.tvm.target import TargetSpec, build

    return load_vm(build(mod, TargetSpec(llvm_opt_level=1)))


@pytest.mark.parametrize("name,threads", [(n, 128) for n in _decode_specs()]
                         + [("int8-per-token-mask", 32), ("fp8-per-head", 32)])
def test_gpu_decode_attention_emulated_matches_numpy(name, threads, rng):
    from kvc.compiler.tvm.kernels.gpu_attention import GpuLaunch

    spec = _decode_specs()[name]
    vm = _run_emulated(_module("decode", spec, GpuLaunch(emulate=True, threads=threads)))
    feeds, want = _feeds("decode", spec, rng)
    (got,) = call_vm(vm, feeds)
    assert got.dtype == np.dtype(spec.query_dtype)
    atol = 2e-3 if spec.query_dtype == "float16" else 1e-5
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=0, atol=atol)


@pytest.mark.parametrize("name,threads", [(n, 128) for n in cases._prefill_specs()]
                         + [("fp32-gqa2-mask", 32), ("int8-per-token-mask", 32)])
def test_gpu_prefill_attention_emulated_matches_numpy(name, threads, rng):
    """Query counts 1, 9 and 17 through one build (symbolic seq): partial tiles, a single query."""
    from kvc.compiler.tvm.kernels.gpu_attention import GpuLaunch

    spec = cases._prefill_specs()[name]
    if spec.group_size * spec.query_tile > threads:
        spec = type(spec)(**{**spec.__dict__, "query_tile": threads // spec.group_size})
    vm = _run_emulated(_module("prefill", spec, GpuLaunch(emulate=True, threads=threads)))
    for seq in (1, 9, 17):
        feeds, want = _feeds("prefill", spec, rng, seq)
        (got,) = call_vm(vm, feeds)
        atol = 2e-3 if spec.query_dtype == "float16" else 1e-5
        np.testing.assert_allclose(got.astype(np.float64), want, rtol=0, atol=atol, err_msg=f"seq={seq}")


@pytest.fixture(scope="module")
def cuda_spec():
    from kvc.compiler.tvm.target import TargetKind, TargetSpec, cuda_codegen_available

    if not cuda_codegen_available():
        pytest.skip("this apache-tvm wheel has no CUDA code generator (target.build.cuda missing)")
    return TargetSpec(TargetKind.CUDA, cuda_arch="sm_90")


@pytest.mark.parametrize("kind,name", [("decode", "int8-per-token-mask-gpu-defaults"), ("decode", "fp16-gqa4"),
                                       ("prefill", "fp8-per-head")])
def test_gpu_attention_builds_for_cuda(kind, name, cuda_spec):
    from kvc.compiler.tvm.kernels.gpu_attention import GpuLaunch
    from kvc.compiler.tvm.target import build

    spec = (_decode_specs() if kind == "decode" else cases._prefill_specs())[name]
    executable = build(_module(kind, spec, GpuLaunch()), cuda_spec)
    device = [m for host in executable.mod.imports for m in [host, *host.imports] if m.kind == "cuda"]
    assert device, "no CUDA module in the build"
    source = device[0].inspect_source()
    names = ("gpu_decode_attention_partial", "gpu_decode_attention_merge") if kind == "decode" \
        else ("gpu_prefill_attention",)
    assert all(f"void __launch_bounds__(128) {n}_kernel(" in source for n in names)
    assert "__syncthreads()" in source and "__shared__" in source


def test_gpu_specs_fit_shared_memory_and_threads():
    from kvc.compiler.tvm.kernels.decode_attention import DecodeAttentionSpec
    from kvc.compiler.tvm.kernels.gpu_attention import SHARED_BUDGET, THREADS, _shared_bytes, gpu_decode_spec, \
        gpu_prefill_spec
    from kvc.compiler.tvm.kernels.prefill_attention import PrefillAttentionSpec
    from kvc.errors import KvcError

    for heads, kv_heads, head_dim in ((32, 8, 64), (32, 8, 128), (64, 8, 128), (16, 16, 256), (28, 4, 128)):
        decode = gpu_decode_spec(DecodeAttentionSpec(heads, kv_heads, head_dim))
        assert _shared_bytes(decode.group_size, decode.chunk_size, head_dim) <= SHARED_BUDGET
        prefill = gpu_prefill_spec(PrefillAttentionSpec(heads, kv_heads, head_dim))
        rows = prefill.group_size * prefill.query_tile
        assert rows <= THREADS and _shared_bytes(rows, prefill.chunk_size, head_dim) <= SHARED_BUDGET
    with pytest.raises(KvcError, match="do not fit"):
        gpu_decode_spec(DecodeAttentionSpec(256, 1, 256))
