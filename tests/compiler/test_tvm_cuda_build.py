"""TVM CUDA builds without a GPU (code generation only; skipped when the TVM wheel cannot generate CUDA):

* the tiny llama's ring graph for fp32 / fp16 / int8 / fp8 caches imports with kvc's GPU attention
  kernels (no CPU-only kernel, no decoded copy of the cache) and builds a CUDA device module;
* MetaSchedule on CUDA: the target carries the limits its rules read and the decode step's weight
  matmul is found; tuning it (measured on the GPU) and building with the database is marked gpu;
* --tune-trials with --target cuda on a machine without a GPU is refused in one line.
Running the built engines on a GPU is tests/gpu/test_cuda_parity.py.
"""
from __future__ import annotations

import pytest

from test_tvm_import import DECODE_SHAPES, kvc_ring_graph, tvm_lowered  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def cuda_spec():
    from kvc.compiler.tvm.target import TargetKind, TargetSpec, cuda_codegen_available

    if not cuda_codegen_available():
        pytest.skip("this apache-tvm wheel has no CUDA code generator (target.build.cuda missing)")
    return TargetSpec(TargetKind.CUDA, cuda_arch="sm_90")


def _cuda_source(executable) -> str:
    device = [m for host in executable.mod.imports for m in [host, *host.imports] if m.kind == "cuda"]
    assert device, "no CUDA device module in the build"
    return device[0].inspect_source()


@pytest.mark.parametrize("kv_dtype", ["fp32", "fp16", "int8", "fp8"])
def test_ring_graph_builds_for_cuda_with_the_gpu_attention_kernels(kv_dtype, kvc_ring_graph, cuda_spec):
    from kvc.compiler.tvm.onnx_import import ImportOptions, from_onnx
    from kvc.compiler.tvm.target import TargetKind, build

    for_cuda = ImportOptions(target_kind=TargetKind.CUDA)
    graph = tvm_lowered(kvc_ring_graph(kv_dtype))
    decode = from_onnx(graph, shape_dict=DECODE_SHAPES, options=for_cuda)
    names = {gv.name_hint for gv in decode.get_global_vars()}
    assert {"gpu_decode_attention_partial", "gpu_decode_attention_merge"} <= names
    assert not any(n.startswith(("decode_attention", "prefill_attention")) for n in names)  # CPU kernels
    source = _cuda_source(build(decode, cuda_spec))
    assert "gpu_decode_attention_partial_kernel(" in source
    if kv_dtype in ("int8", "fp8"):  # the stored codes are what the kernel reads, not a decoded cache
        assert "signed char* __restrict__ KC" in source if kv_dtype == "int8" else "KC_ptr" in source
    prefill = from_onnx(graph, options=for_cuda)
    assert "gpu_prefill_attention" in {gv.name_hint for gv in prefill.get_global_vars()}


def _weight_matmul_module():
    """A decode step's shape of weight matmul (x [1, 1, 64] @ W [64, 128]) legalized, called by the two
    decode entries (kvc's lowering fuses both)."""
    import tvm
    from tvm import relax

    from kvc.compiler.tvm.engine_build import lowering_steps

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 1, 64), "float32"))
    w = relax.Var("w", relax.TensorType((64, 128), "float32"))
    for entry in ("decode", "decode_b1"):
        with bb.function(entry, [x, w]):
            with bb.dataflow():
                out = bb.emit_output(relax.op.matmul(x, w))
            bb.emit_func_output(out)
    return tvm.transform.Sequential(lowering_steps())(bb.get())


def test_cuda_target_carries_what_metaschedule_reads_and_the_kernel_is_found(cuda_spec):
    from kvc.compiler.tvm import tuning

    target = cuda_spec.tvm_target()
    assert {"max_threads_per_block", "max_shared_memory_per_block", "thread_warp_size"} <= set(target.attrs)
    with target:
        assert len(tuning.hot_kernels(_weight_matmul_module(), "decode_b1").functions) == 1


@pytest.mark.gpu
def test_cuda_tuning_database_is_applied_by_the_build(cuda_spec):
    """Marked gpu: measured on the GPU (the same run with MetaSchedule's dummy runner in place of the GPU
    passes here too, but its CUDA search takes ~5 minutes on 2 loaded cores)."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from kvc.compiler.tvm import tuning
    from kvc.compiler.tvm.engine_build import relax_pipeline

    target = cuda_spec.tvm_target()
    with target:
        mod = _weight_matmul_module()
    kernels = tuning.hot_kernels(mod, "decode_b1")
    assert len(kernels.functions) == 1
    database = ms.database.MemoryDatabase()
    tuning.tune(kernels, target, database, trials=4, progress=lambda *_: None)
    assert database.get_all_tuning_records()
    with target:
        tuned = tuning.apply_database_pass(database)(mod)
    name = kernels.get_global_vars()[0].name_hint
    assert "tirx.is_scheduled" in tuned[name].attrs  # the tuned schedule, not left for dlight
    _cuda_source(tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target, database)))


def test_cuda_tuning_without_a_gpu_is_refused_in_one_line(cuda_spec):
    import tvm

    from kvc.compiler.tvm.tuning import runner_for
    from kvc.errors import KvcError

    if tvm.cuda(0).exist:
        pytest.skip("a GPU is present: tuning on CUDA runs")
    with pytest.raises(KvcError, match="measures candidates on a GPU") as error:
        runner_for(cuda_spec.tvm_target())
    assert "\n" not in str(error.value) and "--tuning-db" in str(error.value)


def test_compile_for_cuda_with_tuning_is_refused_before_the_import_without_a_gpu(exported, tmp_path):
    import time

    import tvm
    from click.testing import CliRunner

    from kvc.cli.main import cli

    if tvm.cuda(0).exist:
        pytest.skip("a GPU is present: tuning on CUDA runs")
    _, _, onnx_path = exported("tiny")
    start = time.perf_counter()
    result = CliRunner().invoke(cli, ["compile", str(onnx_path), "-o", str(tmp_path / "o.kvc"), "--engine", "tvm",
                                      "--target", "cuda", "--tune-trials", "4"])
    assert result.exit_code != 0 and "measures candidates on a GPU" in result.output
    assert result.output.strip().count("\n") == 0 and not (tmp_path / "o.kvc").exists()
    assert time.perf_counter() - start < 20  # no graph import first
