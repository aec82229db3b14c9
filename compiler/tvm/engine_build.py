"""The TVM engine's build: ring-buffer ONNX -> Relax (prefill + decode sharing one weight set)
-> lib/<target>.so + params.safetensors.

Entry functions (all tensors on the device; caches updated in place and returned):
  prefill  (input_ids [b, seq], position_ids [b, seq], past_len [b], caches..., weights...)
  decode   (input_ids [b, 1],   position_ids [b, 1],   past_len [b], caches..., weights...)
  decode_b1(input_ids [1, 1],   position_ids [1, 1],   past_len [1], caches[1, ...]..., weights...)
decode_b1 has only static shapes: fewer shape computations per step, and the kernels MetaSchedule
can tune (--tune-trials).
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
from kvc.compiler.tvm.tuning import TUNING_DIR
from kvc.errors import KvcError
from kvc.runtime.artifact import EntryPoint

LIB_DIR = "lib"
PARAMS = "params.safetensors"
SINGLE_ROW_DECODE = "decode_b1"  # decode with every shape static (batch 1): MetaSchedule can tune it
ENTRY_NAMES = ("prefill", "decode", SINGLE_ROW_DECODE)


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


DECODE_SHAPES = ("input_ids", "position_ids")  # [batch, seq] inputs fixed to seq = 1 in decode


def import_entry_points(model: ir.Model, target_kind: str = "llvm") -> tuple[tvm.IRModule, dict[str, list[str]], dict[str, np.ndarray]]:
    """Relax module with `prefill` (symbolic seq), `decode` (seq = 1, so GEMV schedules apply) and
    `decode_b1` (seq = 1 and batch = 1: static shapes, the common single-request step); each
    entry's weight parameter names (the entries share one weight set) and all weight values."""
    from kvc.passes.reshape_to_static import ReshapeToStaticPass

    ReshapeToStaticPass()(model)  # TVM's importer needs reshape targets without shape arithmetic
    _scatter_in_cache_dtype(model)
    prefill_mod = _import(ir.to_proto(model), target_kind)
    weights: dict[str, np.ndarray] = {}
    entry_params = {"prefill": _take_weights(prefill_mod["main"], weights)}
    bb = relax.BlockBuilder(tvm.IRModule({gv: f for gv, f in prefill_mod.functions.items()
                                          if gv.name_hint != "main"}))
    bb.add_func(prefill_mod["main"].without_attr("params").with_attr("global_symbol", "prefill"), "prefill")
    for entry, batch in (("decode", None), (SINGLE_ROW_DECODE, 1)):
        mod = _import(ir.to_proto(_specialize_decode(model, batch)), target_kind)
        entry_params[entry] = _take_weights(mod["main"], weights)
        # the entry's kernels join the module (identical ones are shared); its calls are re-pointed
        renamed = {gv: bb.add_func(func, f"{entry}_{gv.name_hint}")
                   for gv, func in mod.functions.items() if gv.name_hint != "main"}
        main = rename_global_vars(mod["main"], renamed)
        bb.add_func(main.without_attr("params").with_attr("global_symbol", entry), entry)
    return bb.get(), entry_params, weights


def _scatter_in_cache_dtype(model: ir.Model) -> None:
    """Undo the ORT-only fp8 detour present = Cast(TensorScatter(Cast(past, fp16), update16), fp8)
    (ORT's CPU TensorScatter has no float8 kernel): TVM scatters the fp8 bytes in place directly.
    Casting the update back is exact: it holds fp8 values widened to fp16."""
    for node in list(model.graph):
        if node.op_type != "TensorScatter":
            continue
        widen = node.inputs[0].producer()
        users = list(node.outputs[0].uses())
        if widen is None or widen.op_type != "Cast" or widen.inputs[0] not in model.graph.inputs \
                or len(users) != 1 or users[0].node.op_type != "Cast":
            continue
        narrow = users[0].node
        past, present = widen.inputs[0], narrow.outputs[0]
        cast_update = ir.node("Cast", [node.inputs[1]], attributes={"to": past.dtype})
        scatter = ir.node("TensorScatter", [past, cast_update.outputs[0], node.inputs[2]],
                          attributes={k: a for k, a in node.attributes.items()})
        model.graph.insert_before(node, [cast_update, scatter])
        present.replace_all_uses_with(scatter.outputs[0], replace_graph_outputs=True)
        scatter.outputs[0].name, scatter.outputs[0].shape, scatter.outputs[0].type = \
            present.name, present.shape, present.type
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(model)


def _take_weights(func: relax.Function, weights: dict[str, np.ndarray]) -> list[str]:
    """Record the function's trailing weight parameters in ``weights``; return their names."""
    values = func.attrs["params"]
    weight_vars = func.params[len(func.params) - len(values):]
    for value, var in zip(values, weight_vars):
        # Stored values can differ in rank from the declared parameter (0-d scalars come back as [1]).
        array = value.numpy().reshape([int(d) for d in var.ty.shape])
        if var.name in weights and not np.array_equal(weights[var.name], array):
            raise KvcError(f"TVM import: weight {var.name} differs between prefill and decode")
        weights[var.name] = array
    return [v.name for v in weight_vars]


def _specialize_decode(model: ir.Model, batch: int | None) -> ir.Model:
    """A copy of the graph for one new token per call (and ``batch`` rows if given), with the
    shape arithmetic this makes constant folded away (e.g. the ring mask's Range(0, seq))."""
    import onnxscript.optimizer

    decode = ir.from_proto(ir.to_proto(model))
    for value in decode.graph.inputs:
        if value.shape is None:
            continue
        dims = list(value.shape)
        if value.name in DECODE_SHAPES:
            dims[1] = 1
        if batch is not None and dims:
            dims[0] = batch
        value.shape = ir.Shape(dims)
    onnxscript.optimizer.optimize(decode, num_iterations=2)
    return decode


def _import(proto, target_kind: str) -> tvm.IRModule:
    from kvc.compiler.tvm import onnx_import
    from kvc.compiler.tvm.target import TargetKind
    from kvc.compiler.tvm_inplace import InPlaceTensorScatter

    graph = proto.graph
    converters = dict(onnx_import._standard_domain_converters(graph))
    converters["TensorScatter"] = InPlaceTensorScatter
    importer = onnx_import.KvcGraphImporter(graph, converters, onnx_import._input_shapes(graph, {}),
                                            onnx_import.ImportOptions(keep_params_in_input=True,
                                                                      target_kind=TargetKind(target_kind)))
    mod = importer.from_onnx(graph, onnx_import._default_opset(proto))
    return relax.transform.DeadCodeElimination()(mod)


def lowering_steps() -> list:
    """Legalization and decode fusion: the module MetaSchedule tunes and dlight schedules."""
    from tvm.relax import backend, transform

    return [backend.DispatchSampling(), backend.DispatchSortScan(), transform.LegalizeOps(), _fuse_decode_pass]


def relax_pipeline(target: tvm.target.Target, database=None):
    """TVM's default build steps with dlight schedules applied after legalization: kvc's weight
    matmul rule, GEMV and reductions on the CPU, matmul/GEMV/reduction rules plus a thread-binding
    fallback on CUDA; kernels in the MetaSchedule ``database`` get their tuned schedule first.
    Only decode is fused (kvc.compiler.tvm.decode_fusion): FuseOps loses the definition of
    prefill's data-dependent query length (VMShapeLower then fails)."""
    from tvm.relax import transform
    from tvm.s_tir import dlight as dl

    from kvc.compiler.tvm.schedules import CpuWeightMatmul
    from kvc.compiler.tvm.tuning import apply_database_pass

    if target.kind.name == "cuda":
        rules = [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
    else:
        rules = [CpuWeightMatmul(), dl.cpu.GEMV(), dl.cpu.Reduction()]
    tuned = [apply_database_pass(database)] if database is not None else []

    @tvm.transform.module_pass(opt_level=0)
    def pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential([
                *lowering_steps(), *tuned, dl.ApplyDefaultSchedule(*rules),
                transform.RewriteDataflowReshape(), transform.ToNonDataflow(), transform.RemovePurityChecking(),
                transform.CallTIRRewrite(), transform.StaticPlanBlockMemory(), transform.LowerAllocTensor(),
                transform.KillAfterLastUse(), transform.LowerRuntimeBuiltin(), transform.ComputePrimValue(),
                transform.VMShapeLower(), transform.AttachGlobalSymbol(),
            ])(mod)

    return pipeline


@tvm.transform.module_pass(opt_level=0, name="KvcFuseDecode")
def _fuse_decode_pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    for entry in ("decode", SINGLE_ROW_DECODE):
        mod = fuse_decode(mod, entry)
    return mod


def build_tvm(model: ir.Model, staging: Path, options: CompileOptions, progress=print) -> tuple[list[EntryPoint], dict]:
    from safetensors.numpy import save_file

    aliases = in_place_aliases(model)
    target = tvm_target(options)
    # The code generator, not a GPU, is what a CUDA build needs (nvcc compiles without a device).
    if options.device is Device.CUDA and tvm.get_global_func("target.build.cuda", allow_missing=True) is None:
        raise KvcError("this TVM build has no CUDA code generator; use --target cpu or a CUDA-enabled TVM")
    mod, entry_params, weights = import_entry_points(model, target.kind.name)
    database = _tune(mod, target, staging, options, progress)
    progress(f"tvm: building {', '.join(ENTRY_NAMES)} for {target.kind.name}")
    executable = tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target, database))
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
                     "cache_inputs": [v.name for v in model.graph.inputs if v.name.startswith("past_key_values.")]}


def _tune(mod: tvm.IRModule, target: tvm.target.Target, staging: Path, options: CompileOptions, progress):
    """The MetaSchedule database to build with (tuned now and/or reused), or None when not asked."""
    from kvc.compiler.tvm.tuning import TuningRequest, hot_kernels, open_database, tune

    if options.tune_trials == 0 and options.tuning_db is None:
        return None
    if target.kind.name != "llvm":
        raise KvcError("MetaSchedule tuning is implemented for --target cpu only; build CUDA with --tune-trials 0")
    database = open_database(staging, TuningRequest(options.tune_trials, options.tuning_db))
    if options.tune_trials > 0:
        with target:
            lowered = tvm.transform.Sequential(lowering_steps())(mod)
        tune(hot_kernels(lowered, SINGLE_ROW_DECODE), target, database, options.tune_trials, progress)
    return database


def _shape(value: ir.Value) -> list:
    return [] if value.shape is None else [d if isinstance(d, int) else str(d) for d in value.shape]
