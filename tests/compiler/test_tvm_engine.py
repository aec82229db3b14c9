"""The TVM engine on llvm vs the ORT engine on the same optimized graph: prefill + 64 decode steps."""
from __future__ import annotations

import numpy as np
import pytest

from kvc.runtime import load
from kvc.runtime.sampling import SamplingParams

STEPS = 64
# fp32 is the same arithmetic in another order; quantized caches round the same values, but a
# logit that lands on a rounding boundary may quantize one step apart between the two engines.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-3, "int8": 1e-3, "fp8": 1e-3}


def logits_trace(model, prompt: list[int], tokens: list[int]) -> list[np.ndarray]:
    """Logits of a prefill on ``prompt`` and of decode steps feeding ``tokens`` one at a time."""
    out = [model.prefill(np.array([prompt]))[0, -1]]
    past = np.array([len(prompt)])
    for token in tokens:
        out.append(model.decode(np.array([token]), past)[0])
        past = past + 1
    return out


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2", "tiny-mistral", "tiny-gpt2"])
def test_fp32_tvm_matches_ort_and_greedy_tokens_are_identical(compiled, preset):
    ort_model = load(compiled(preset, capacity=96))
    tvm_model = load(compiled(preset, capacity=96, engine="tvm"))
    prompt = [3, 14, 15, 92, 65]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=STEPS, ignore_eos=True)
    tokens = ort_model.generate(prompt, greedy).token_ids
    assert tvm_model.generate(prompt, greedy).token_ids == tokens
    for step, (a, b) in enumerate(zip(logits_trace(ort_model, prompt, tokens), logits_trace(tvm_model, prompt, tokens))):
        np.testing.assert_allclose(b, a, atol=TOLERANCE["fp32"], rtol=0, err_msg=f"step {step}")


# tiny-qwen3's head size 32 takes the decode kernel's integer dot products for int8 on AVX-512 BW CPUs
@pytest.mark.parametrize("preset,kv_dtype",
                         [("tiny", "fp16"), ("tiny", "int8"), ("tiny", "fp8"), ("tiny-qwen3", "int8")])
def test_quantized_caches_match_ort(compiled, preset, kv_dtype):
    ort_model = load(compiled(preset, kv_dtype=kv_dtype, capacity=96))
    tvm_model = load(compiled(preset, kv_dtype=kv_dtype, capacity=96, engine="tvm"))
    prompt = [7, 1, 8, 2, 8]
    tokens = ort_model.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=STEPS, ignore_eos=True)).token_ids
    worst = max(float(np.abs(a - b).max()) for a, b in
                zip(logits_trace(ort_model, prompt, tokens), logits_trace(tvm_model, prompt, tokens)))
    assert worst <= TOLERANCE[kv_dtype], f"{kv_dtype}: max |tvm - ort| = {worst:.2e}"


def test_caches_are_updated_in_place_without_copies(compiled):
    model = load(compiled("tiny", capacity=32, engine="tvm"))
    engine = model.engine
    pointers = {name: cache.data_ptr() for name, cache in engine.caches.items()}
    model.prefill(np.array([[1, 2, 3, 4]]))
    model.decode(np.array([5]), np.array([4]))
    assert {name: cache.data_ptr() for name, cache in engine.caches.items()} == pointers
    key = engine.caches["past_key_values.0.key"].numpy()
    assert np.any(key[0, :, :5] != 0) and np.all(key[0, :, 5:] == 0)


def test_artifact_layout(compiled):
    root = compiled("tiny", capacity=32, engine="tvm")
    from kvc.runtime.artifact import validate_artifact

    manifest = validate_artifact(root)
    assert manifest.engine == "tvm" and (root / "lib" / "llvm.so").is_file()
    assert [e.name for e in manifest.entry_points] == ["prefill", "decode", "decode_b1"]
    assert manifest.versions["tvm"]


@pytest.fixture(scope="module")
def tuned(exported, tmp_path_factory):
    """tiny compiled with 14 MetaSchedule trials (2 for each of decode_b1's 7 weight matmuls), and
    again from that database without tuning."""
    from kvc.compiler.options import CompileOptions, EngineKind
    from kvc.compiler.pipeline import compile_model

    _, _, onnx_path = exported("tiny")
    root = tmp_path_factory.mktemp("tuned")
    compile_model(onnx_path, root / "tuned.kvc", CompileOptions(engine=EngineKind.TVM, max_seq_len=32,
                                                              tune_trials=14), progress=lambda *_: None)
    compile_model(onnx_path, root / "reused.kvc", CompileOptions(engine=EngineKind.TVM, max_seq_len=32,
                                                               tuning_db=root / "tuned.kvc" / "tuning"),
                  progress=lambda *_: None)
    return root / "tuned.kvc", root / "reused.kvc"


def test_tuned_build_matches_ort_and_stores_a_reusable_database(compiled, tuned):
    from kvc.compiler.tvm.tuning import DB_FILES

    tuned_root, reused_root = tuned
    ort_model = load(compiled("tiny", capacity=32))
    prompt, tokens = [4, 8, 15, 16, 23], [42, 7, 99, 3, 1, 200]
    expected = logits_trace(ort_model, prompt, tokens)
    for root in (tuned_root, reused_root):
        model = load(root)
        assert model.manifest.engine_options["tuning"] == "tuning"
        for step, (a, b) in enumerate(zip(expected, logits_trace(model, prompt, tokens))):
            np.testing.assert_allclose(b, a, atol=TOLERANCE["fp32"], rtol=0, err_msg=f"{root.name} step {step}")
    records = (tuned_root / "tuning" / DB_FILES[1]).read_text().splitlines()
    assert len(records) >= 14  # every measured candidate is recorded
    assert (reused_root / "tuning" / DB_FILES[1]).read_text().splitlines() == records  # copied, not re-tuned


def test_tuned_schedules_replace_the_default_ones(exported, tuned):
    """The database's schedules are applied to decode_b1's weight matmuls (dlight then skips them)."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from kvc.compiler.options import CompileOptions
    from kvc.compiler.tvm import tuning
    from kvc.compiler.tvm.engine_build import import_entry_points, lowering_steps, tvm_target
    from kvc.contract import EngineKind, Entry
    from kvc.passes.graph_checks import load_model_checked
    from kvc.passes.pipeline import PipelineOptions, default_passes, lowering_passes, run_passes

    _, config, onnx_path = exported("tiny")
    model = load_model_checked(onnx_path)
    run_passes(model, default_passes(PipelineOptions(capacity=32, max_positions=config.max_position_embeddings))
               + lowering_passes(EngineKind.TVM))
    mod, _, _ = import_entry_points(model)
    database = ms.database.JSONDatabase(*(str(tuned[0] / "tuning" / n) for n in tuning.DB_FILES))
    with tvm_target(CompileOptions()):
        lowered = tvm.transform.Sequential(lowering_steps())(mod)
        hot = [gv.name_hint for gv in tuning.hot_kernels(lowered, Entry.DECODE_B1.value).functions]
        applied = tuning.apply_database_pass(database)(lowered)
    assert hot and all("tirx.is_scheduled" in (applied[name].attrs or {}) for name in hot)
    assert not any("tirx.is_scheduled" in (lowered[name].attrs or {}) for name in hot)


def test_the_database_holds_kvcs_own_schedule_of_every_tuned_kernel_measured(tuned):
    """Tuning measures kvc's own schedules first, so the build takes the faster of them and the search's
    best: every tuned kernel has a measured record that replays to exactly kvc's schedule, besides the
    search's. (The search may also write a record that samples nothing, for a kernel its space has only one
    sketch for, so records are told apart by what they replay to.)"""
    import tvm
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    from kvc.compiler.tvm import tuning

    database = ms.database.JSONDatabase(*(str(tuned[0] / "tuning" / n) for n in tuning.DB_FILES))
    target = tvm.target.Target({"kind": "llvm"})
    by_workload = {}
    for record in database.get_all_tuning_records():
        by_workload.setdefault(tvm_ffi.structural_hash(record.workload.mod), []).append(record)
    assert len(by_workload) >= 3  # the tiny model's decode_b1 weight matmuls
    for records in by_workload.values():
        workload = records[0].workload.mod
        ours = next(s for s in (r.apply(workload["main"], target, False) for r in tuning.own_schedule_rules()) if s)
        own = [r for r in records if _replays_to(r, workload, ours.mod)]
        assert len(own) >= 1 and all(r.run_secs for r in own) and len(records) > len(own)


def _replays_to(record, workload, scheduled) -> bool:
    import tvm
    import tvm_ffi

    if any(str(i.kind.name).startswith("Sample") for i in record.trace.insts):
        return False
    replayed = tvm.s_tir.Schedule(workload)
    try:
        record.trace.apply_to_schedule(replayed, remove_postproc=False)
    except Exception:  # a trace from another sketch need not apply here: it is not kvc's
        return False
    return tvm_ffi.structural_equal(replayed.mod, scheduled)


def test_tuning_requests_that_cannot_work_are_refused_before_anything_is_written(exported, tmp_path):
    from kvc.compiler.options import CompileOptions, EngineKind
    from kvc.compiler.pipeline import compile_model
    from kvc.errors import KvcError

    _, _, onnx_path = exported("tiny")
    with pytest.raises(KvcError, match="add --engine tvm"):
        compile_model(onnx_path, tmp_path / "o.kvc", CompileOptions(engine=EngineKind.ORT, tune_trials=8),
                      progress=lambda *_: None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(KvcError, match="has no database_workload.json"):
        compile_model(onnx_path, tmp_path / "t.kvc", CompileOptions(engine=EngineKind.TVM, max_seq_len=32,
                                                                   tuning_db=tmp_path / "empty"),
                      progress=lambda *_: None)
    assert not (tmp_path / "o.kvc").exists() and not (tmp_path / "t.kvc").exists()


def test_batched_decode_and_single_row_decode_agree(compiled):
    """Batch 1 runs the static decode_b1 entry, batch 2 the symbolic decode: same tokens."""
    from kvc.runtime.model import LoadOptions, load as load_with_options

    model = load_with_options(compiled("tiny", capacity=32, engine="tvm"), LoadOptions(max_batch=2))
    prompts = [[5, 6, 7, 8], [9, 10]]
    params = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
    assert [r.token_ids for r in model.generate(prompts, params)] == \
        [model.generate(p, params).token_ids for p in prompts]


def test_default_build_is_for_this_cpu_and_generic_builds_agree(compiled, exported, tmp_path, llvm_o3):
    """The generic build is also at LLVM's default level, as users get it (the suite's other builds are at
    -O0, tests/conftest.py): the two levels agree too."""
    from kvc.compiler.options import CompileOptions, EngineKind
    from kvc.compiler.pipeline import compile_model
    from kvc.compiler.tvm.target import host_cpu

    native = load(compiled("tiny", capacity=32, engine="tvm"))
    assert native.manifest.engine_options["llvm_cpu"] == host_cpu()
    _, _, onnx_path = exported("tiny")
    compile_model(onnx_path, tmp_path / "generic.kvc", CompileOptions(engine=EngineKind.TVM, max_seq_len=32,
                                                                     cpu="generic"), progress=lambda *_: None)
    generic = load(tmp_path / "generic.kvc")
    assert generic.manifest.engine_options["llvm_cpu"] is None
    prompt = [2, 7, 1, 8]
    for a, b in zip(logits_trace(native, prompt, [5, 9, 11]), logits_trace(generic, prompt, [5, 9, 11])):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


def test_unknown_cpu_name_is_refused_before_anything_is_written(exported, tmp_path):
    from kvc.compiler.options import CompileOptions, EngineKind
    from kvc.compiler.pipeline import compile_model
    from kvc.errors import KvcError

    _, _, onnx_path = exported("tiny")
    with pytest.raises(KvcError, match="--cpu 'pentium9' is not a CPU LLVM knows"):
        compile_model(onnx_path, tmp_path / "t.kvc", CompileOptions(engine=EngineKind.TVM, max_seq_len=32,
                                                                   cpu="pentium9"), progress=lambda *_: None)
    assert not (tmp_path / "t.kvc").exists()


def test_library_for_a_cpu_with_more_vector_instructions_is_refused():
    import tvm
    from tvm.target import codegen

    from kvc.errors import ArtifactError
    from kvc.runtime.tvm_engine import _check_cpu_features

    _check_cpu_features(codegen.llvm_get_system_cpu())  # this machine's own CPU is always fine
    _check_cpu_features("x86-64")
    here = {str(f) for f in codegen.llvm_get_cpu_features(
        tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()}))}
    if "avx512f" in here:
        pytest.skip("this CPU has AVX-512: no well-known CPU with more vector instructions to test against")
    with pytest.raises(ArtifactError, match="lacks .*avx512f.*--cpu generic"):
        _check_cpu_features("sapphirerapids")


@pytest.mark.parametrize("threads", [1, 0])
def test_thread_pool_follows_the_first_loads_options(compiled, threads):
    """TVM's pool is process-wide: the first TVM load in a fresh process sizes it (0: one thread per
    usable core); a later load asking for another count is refused (tests/runtime/test_threads_and_rows)."""
    import subprocess
    import sys

    artifact = compiled("tiny", capacity=32, engine="tvm")
    code = ("import os, tvm; from kvc.runtime.model import LoadOptions, load; "
            f"load({str(artifact)!r}, LoadOptions(threads={threads})); "
            f"assert tvm.get_global_func('runtime.NumThreads')() == ({threads} or len(os.sched_getaffinity(0)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

@pytest.mark.parametrize("kv_dtype", ["int8", "fp8"])
def test_quantized_caches_and_scales_are_updated_in_place(compiled, kv_dtype):
    """The fused quantized write (ai.kvc QuantizedRingWrite) writes codes and scales into the bound buffers."""
    model = load(compiled("tiny", kv_dtype=kv_dtype, capacity=32, engine="tvm"))
    engine = model.engine
    pointers = {name: cache.data_ptr() for name, cache in engine.caches.items()}
    assert any(name.endswith("key_scale") for name in pointers)
    model.prefill(np.array([[1, 2, 3, 4]]))
    model.decode(np.array([5]), np.array([4]))
    assert {name: cache.data_ptr() for name, cache in engine.caches.items()} == pointers
    scale = engine.caches["past_key_values.0.key_scale"].numpy()
    assert np.all(scale[0, :, :5] > 0) and np.all(scale[0, :, 5:] == 0)
