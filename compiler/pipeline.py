"""`kvc compile`: ONNX -> model description (resolved once) -> neutral passes -> the engine's lowering
passes -> engine build -> artifact directory (written atomically). See ARCHITECTURE.md."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from kvc.compiler.artifact_writer import copy_side_files, write_manifest
from kvc.compiler.model_description import ModelDescription, describe_model
from kvc.compiler.options import CompileOptions, Device
from kvc.compiler.original_check import OriginalCheck
from kvc.contract import CacheLayoutKind, EngineKind, Entry
from kvc.errors import KvcError
from kvc.fsutil import atomic_dir
from kvc.passes.base import PassReport
from kvc.passes.pipeline import PipelineOptions, default_passes, lower_entries, lowering_passes, run_passes
from kvc.runtime.artifact import CacheSpec, Manifest


@dataclass
class CompileResult:
    manifest: Manifest
    reports: list[PassReport]
    config_source: str


def compile_model(onnx_path: Path, output: Path, options: CompileOptions, overwrite: bool = False,
                  progress=print) -> CompileResult:
    from kvc.passes.graph_checks import load_model_checked

    if options.engine is EngineKind.ORT and (options.tune_trials or options.tuning_db is not None):
        raise KvcError("--tune-trials and --tuning-db tune the TVM engine's kernels; add --engine tvm")
    if options.engine is EngineKind.TVM and options.device is Device.CUDA and options.tune_trials:
        from kvc.compiler.tvm.target import TargetKind, TargetSpec
        from kvc.compiler.tvm.tuning import runner_for

        runner_for(TargetSpec(TargetKind.CUDA).tvm_target())  # refuses now, not after the import, without a GPU
    model = load_model_checked(onnx_path)
    description = describe_model(model, onnx_path.parent, options)
    pipeline = dataclasses.replace(pipeline_options(description), weights=options.weight_quant)
    passes = default_passes(pipeline) + lowering_passes(options.engine)
    reports = run_passes(model, passes, options.dump_passes, _verifier(options))
    # after the passes, whose refusals name what they cannot express (the original may fail to run as well)
    check = OriginalCheck.prepare(onnx_path, description, options)
    entry_graphs, entry_reports = lower_entries(model, options.engine, options.dump_passes, len(passes) + 1)
    reports += entry_reports
    for r in reports:
        progress(_format_report(r))
    cache = _cache_spec(model)
    with atomic_dir(output, overwrite=overwrite) as staging:
        entry_points, engine_options = _build(entry_graphs, staging, options, len(reports) + 1, progress)
        copy_side_files(onnx_path.parent, staging)
        manifest = write_manifest(staging, engine=options.engine.value, target=options.device.value,
                                  model=description.config.to_dict(), cache=cache, entry_points=entry_points,
                                  passes=[r.to_dict() for r in reports], generation=description.generation,
                                  engine_options=engine_options)
        if check is not None:  # a mismatch raises here: the staging directory goes, nothing is written
            progress(check.against(staging, options).summary)
    return CompileResult(manifest, reports, description.config_source)


def pipeline_options(description: ModelDescription) -> PipelineOptions:
    return PipelineOptions(capacity=description.capacity, kv_dtype=description.kv_dtype,
                           sliding_window=description.sliding_window, layer_windows=description.layer_windows,
                           fp8_scales=description.fp8_scales, max_positions=description.max_positions)


def _verifier(options: CompileOptions):
    if not options.verify:
        return None
    from kvc.compiler.verify import max_abs_diff

    return max_abs_diff


def _build(entry_graphs: dict[Entry, ir.Model], staging: Path, options: CompileOptions, first_dump_index: int,
           progress):
    """The engine's build of the lowered graphs (one per entry point); Relax dumps continue the pass
    dumps' numbering."""
    if options.engine is EngineKind.ORT:
        from kvc.compiler.ort_build import build_ort

        return build_ort(entry_graphs[Entry.PREFILL], staging)  # one graph serves every entry
    from kvc.compiler.tvm.engine_build import build_tvm
    from kvc.compiler.tvm.relax_dump import RelaxDump

    dump = RelaxDump(options.dump_passes, first_dump_index) if options.dump_passes is not None else None
    return build_tvm(entry_graphs, staging, options, progress, dump)


def _format_report(r: PassReport) -> str:
    on = f" ({r.entry})" if r.entry else ""
    line = f"pass {r.name}{on}: {r.matched} match{'es' if r.matched != 1 else ''}"
    if r.max_abs_diff is not None:
        line += f", max |diff| vs previous graph {r.max_abs_diff:.2e}"
    return "\n  ".join([line] + r.notes)


def _cache_spec(model: ir.Model) -> CacheSpec:
    """The cache as the passes left it (their layout metadata is the single source of truth)."""
    from kvc.passes.kv_layout import KvCacheLayout

    layout = KvCacheLayout.read_from(model)
    return CacheSpec(layout=CacheLayoutKind.RING.value, capacity=layout.capacity, dtype=layout.dtype.value,
                     scales=layout.scales.value, num_layers=layout.num_layers, num_kv_heads=layout.num_kv_heads,
                     head_dim=layout.head_dim, sliding_window=layout.sliding_window,
                     layer_windows=layout.layer_windows)
