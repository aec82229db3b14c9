"""The TVM engine's build: ring-buffer ONNX -> Relax (prefill + decode sharing one weight set)
-> lib/<target>.so + params.safetensors.

Entry functions (all tensors on the device; caches updated in place and returned):
  prefill  (input_ids [b, seq], position_ids [b, seq], past_len [b], caches..., weights...)
  decode   (input_ids [b, 1],   position_ids [b, 1],   past_len [b], caches..., weights...)
  decode_b1(input_ids [1, 1],   position_ids [1, 1],   past_len [1], caches[1, ...]..., weights...)
decode_b1 has only static shapes: fewer shape computations per step, and the kernels MetaSchedule
can tune (--tune-trials).

The graphs arrive fully lowered for TVM, one per entry (kvc.passes.pipeline: lowering_passes, then
lower_entries specializes decode's copies); this module only imports them
(kvc.compiler.tvm.onnx_import.from_onnx, once per entry) and builds. With --dump-passes, the Relax
module is written as text after import and after each phase of the build (kvc.compiler.tvm.relax_dump).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx_ir as ir
import tvm
from tvm import relax

from kvc.compiler.options import CompileOptions, Device
from kvc.compiler.ort_build import in_place_aliases
from kvc.compiler.tvm.decode_fusion import fuse_decode, rename_global_vars
from kvc.compiler.tvm.relax_dump import RelaxDump
from kvc.compiler.tvm.tuning import TUNING_DIR
from kvc.contract import ENTRY_NAMES, EngineKind, Entry, is_past
from kvc.errors import KvcError
from kvc.passes.pipeline import lower_entries
from kvc.runtime.artifact import EntryPoint

LIB_DIR = "lib"
PARAMS = "params.safetensors"
DECODE_ENTRIES = (Entry.DECODE, Entry.DECODE_B1)  # one new token per row; DECODE_B1 also batch 1


def tvm_target(options: CompileOptions) -> tvm.target.Target:
    from kvc.compiler.tvm.target import TargetKind, TargetSpec

    if options.device is Device.CUDA:
        return TargetSpec(TargetKind.CUDA).tvm_target()
    # MetaSchedule needs the core count in the target; the schedules parallelize over it.
    return TargetSpec(llvm_cpu=llvm_cpu_name(options.cpu), num_cores=len(os.sched_getaffinity(0))).tvm_target()


def llvm_cpu_name(cpu: str) -> str | None:
    """LLVM's CPU name for --cpu: native -> this machine's, generic -> None (baseline x86-64)."""
    from kvc.compiler.options import GENERIC_CPU, NATIVE_CPU
    from kvc.compiler.tvm.target import host_cpu

    if cpu == NATIVE_CPU:
        return host_cpu()
    if cpu == GENERIC_CPU:
        return None
    if cpu not in _llvm_cpu_names():
        raise KvcError(f"--cpu {cpu!r} is not a CPU LLVM knows; use native, generic, or a name such as "
                       f"{host_cpu()!r} (this machine)")
    return cpu


def _llvm_cpu_names() -> set[str]:
    from tvm.target import codegen

    return set(codegen.llvm_get_cpu_archlist(tvm.target.Target({"kind": "llvm"})))


def import_entry_points(graphs: ir.Model | dict[Entry, ir.Model], target: tvm.target.Target | None = None
                        ) -> tuple[tvm.IRModule, dict[str, list[str]], dict[str, np.ndarray]]:
    """Relax module with `prefill` (symbolic seq), `decode` (seq = 1, so GEMV schedules apply) and
    `decode_b1` (seq = 1 and batch = 1: static shapes, the common single-request step); each
    entry's weight parameter names (the entries share one weight set) and all weight values.
    ``graphs``: each entry's graph as kvc.passes.pipeline.lower_entries makes them, or the lowered
    graph, whose entry graphs are then made here (read, not changed). ``target`` (default: generic llvm)
    picks CPU or GPU kernels, and whether fp8 caches decode through hardware float16 conversion."""
    from kvc.compiler.tvm.onnx_import import ImportOptions, from_onnx
    from kvc.compiler.tvm.target import TargetKind, converts_half_in_hardware, has_avx512bw

    target = target or tvm.target.Target({"kind": "llvm"})
    options = ImportOptions(keep_params_in_input=True, in_place_cache_writes=True,
                            target_kind=TargetKind(target.kind.name), hardware_half=converts_half_in_hardware(target),
                            avx512_int16=has_avx512bw(target))
    if isinstance(graphs, ir.Model):
        graphs, _ = lower_entries(graphs, EngineKind.TVM)
    prefill = Entry.PREFILL.value
    prefill_mod = from_onnx(ir.to_proto(graphs[Entry.PREFILL]), options=options)
    weights: dict[str, np.ndarray] = {}
    entry_params = {prefill: _take_weights(prefill_mod["main"], weights)}
    bb = relax.BlockBuilder(tvm.IRModule({gv: f for gv, f in prefill_mod.functions.items()
                                          if gv.name_hint != "main"}))
    bb.add_func(prefill_mod["main"].without_attr("params").with_attr("global_symbol", prefill), prefill)
    for entry in DECODE_ENTRIES:
        mod = from_onnx(ir.to_proto(graphs[entry]), options=options)
        entry_params[entry.value] = _take_weights(mod["main"], weights)
        # the entry's kernels join the module (identical ones are shared); its calls are re-pointed
        renamed = {gv: bb.add_func(func, f"{entry.value}_{gv.name_hint}")
                   for gv, func in mod.functions.items() if gv.name_hint != "main"}
        main = rename_global_vars(mod["main"], renamed)
        bb.add_func(main.without_attr("params").with_attr("global_symbol", entry.value), entry.value)
    return bb.get(), entry_params, weights


def _take_weights(func: relax.Function, weights: dict[str, np.ndarray]) -> list[str]:
    """Record the function's trailing weight parameters in ``weights``; return their names."""
    values = func.attrs["params"]
    weight_vars = func.params[len(func.params) - len(values):]
    for value, var in zip(values, weight_vars):
        # Stored values can differ in rank from the declared parameter (0-d scalars come back as [1]).
        array = value.numpy().reshape([int(d) for d in var.ty.shape])
        if var.name in weights and (weights[var.name].dtype != array.dtype
                                    or not np.array_equal(weights[var.name], array)):
            raise KvcError(f"TVM import: weight {var.name} differs between prefill and decode")
        weights[var.name] = array
    return [v.name for v in weight_vars]


def lowering_steps() -> list:
    """Legalization and decode fusion: the module MetaSchedule tunes and dlight schedules."""
    from tvm.relax import backend, transform

    return [backend.DispatchSampling(), backend.DispatchSortScan(), transform.LegalizeOps(), _fuse_decode_pass]


def relax_pipeline(target: tvm.target.Target, database=None, dump: RelaxDump | None = None):
    """TVM's default build steps with dlight schedules applied after legalization: kvc's weight
    matmul rule, GEMV and reductions on the CPU, matmul/GEMV/reduction rules plus a thread-binding
    fallback on CUDA; kernels in the MetaSchedule ``database`` get their tuned schedule first.
    Only decode is fused (kvc.compiler.tvm.decode_fusion): FuseOps loses the definition of
    prefill's data-dependent query length (VMShapeLower then fails). ``dump`` writes the module
    after each phase: legalized and fused, tuned, scheduled, lowered to the VM."""
    from tvm.relax import transform
    from tvm.s_tir import dlight as dl

    from kvc.compiler.tvm.schedules import CpuPackedMatmul, CpuRowReduction, CpuWeightMatmul
    from kvc.compiler.tvm.tuning import apply_database_pass

    if target.kind.name == "cuda":
        rules = [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
    else:
        # CpuRowReduction before dlight's Reduction: that one recomputes a norm's row sum per element
        rules = [CpuPackedMatmul(), CpuWeightMatmul(), CpuRowReduction(), dl.cpu.GEMV(), dl.cpu.Reduction()]
    tuned = [apply_database_pass(database)] if database is not None else []

    phases = [
        ("legalize_and_fuse", lowering_steps()),
        ("apply_tuning_database", tuned),
        ("schedule", [dl.ApplyDefaultSchedule(*rules)]),
        ("lower_to_vm", [transform.RewriteDataflowReshape(), transform.ToNonDataflow(),
                         transform.RemovePurityChecking(), transform.CallTIRRewrite(),
                         transform.StaticPlanBlockMemory(), transform.LowerAllocTensor(),
                         transform.KillAfterLastUse(), transform.LowerRuntimeBuiltin(),
                         transform.ComputePrimValue(), transform.VMShapeLower(), transform.AttachGlobalSymbol()]),
    ]
    steps = []
    for name, passes in phases:
        if passes:
            steps += passes + ([dump.after(name)] if dump is not None else [])

    @tvm.transform.module_pass(opt_level=0)
    def pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(steps)(mod)

    return pipeline


@tvm.transform.module_pass(opt_level=0, name="KvcFuseDecode")
def _fuse_decode_pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    for entry in DECODE_ENTRIES:
        mod = fuse_decode(mod, entry.value)
    return mod


def build_tvm(entry_graphs: dict[Entry, ir.Model], staging: Path, options: CompileOptions, progress=print,
              dump: RelaxDump | None = None) -> tuple[list[EntryPoint], dict]:
    """Build each entry's lowered graph (read, not changed; kvc.passes.pipeline.lower_entries) into
    ``staging``; entry points and engine options. The entries share the prefill graph's I/O."""
    model = entry_graphs[Entry.PREFILL]
    from safetensors.numpy import save_file

    aliases = in_place_aliases(model)
    target = tvm_target(options)
    # The code generator, not a GPU, is what a CUDA build needs (nvcc compiles without a device).
    if options.device is Device.CUDA and tvm.get_global_func("target.build.cuda", allow_missing=True) is None:
        raise KvcError("this TVM build has no CUDA code generator; use --target cpu or a CUDA-enabled TVM")
    mod, entry_params, weights = import_entry_points(entry_graphs, target)
    if dump is not None:
        dump.write("import", mod)
    database = _tune(mod, target, staging, options, progress)
    progress(f"tvm: building {', '.join(ENTRY_NAMES)} for {target.kind.name}")
    executable = tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target, database, dump))
    (staging / LIB_DIR).mkdir()
    lib_name = f"{LIB_DIR}/{target.kind.name}.so"
    executable.export_library(str(staging / lib_name))
    # copy(order="C"), not ascontiguousarray: the latter turns 0-d scalars into [1]
    save_file({name: value.copy(order="C") for name, value in weights.items()}, str(staging / PARAMS))
    inputs = {v.name: _shape(v) for v in model.graph.inputs}
    outputs = {v.name: _shape(v) for v in model.graph.outputs}
    entries = [EntryPoint(name=n, inputs=inputs, outputs=outputs, aliases=aliases) for n in ENTRY_NAMES]
    llvm_cpu = str(target.attrs["mcpu"]) if target.kind.name == "llvm" and "mcpu" in target.attrs else None
    return entries, {"lib": lib_name, "params": PARAMS, "target": target.kind.name, "llvm_cpu": llvm_cpu,
                     "entry_params": entry_params, "tuning": TUNING_DIR if database is not None else None,
                     "cache_inputs": [v.name for v in model.graph.inputs if is_past(v.name)]}


def _tune(mod: tvm.IRModule, target: tvm.target.Target, staging: Path, options: CompileOptions, progress):
    """The MetaSchedule database to build with (tuned now and/or reused), or None when not asked."""
    from kvc.compiler.tvm.tuning import TuningRequest, hot_kernels, open_database, tune

    if options.tune_trials == 0 and options.tuning_db is None:
        return None
    database = open_database(staging, TuningRequest(options.tune_trials, options.tuning_db))
    if options.tune_trials > 0:
        with target:
            lowered = tvm.transform.Sequential(lowering_steps())(mod)
        tune(hot_kernels(lowered, Entry.DECODE_B1.value), target, database, options.tune_trials, progress)
    return database


def _shape(value: ir.Value) -> list:
    return [] if value.shape is None else [d if isinstance(d, int) else str(d) for d in value.shape]
