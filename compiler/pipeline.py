"""`kvc compile`: ONNX -> passes -> engine build -> artifact directory (written atomically)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from kvc.compiler.artifact_writer import copy_side_files, write_manifest
from kvc.compiler.model_info import model_config_for
from kvc.compiler.options import CompileOptions, EngineKind
from kvc.errors import KvcError
from kvc.fsutil import atomic_dir
from kvc.passes.base import PassReport
from kvc.passes.pipeline import PipelineOptions, default_passes, lowering_passes, run_passes
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
    model = load_model_checked(onnx_path)
    config, config_source = model_config_for(model, options.config_path)
    capacity = options.capacity_for(config.max_position_embeddings)
    window = options.sliding_window if options.sliding_window is not None else config.sliding_window
    pipeline = PipelineOptions(capacity=capacity, kv_dtype=options.kv_dtype, sliding_window=window,
                               fp8_scales=_read_scales(options.kv_scales),
                               max_positions=config.max_position_embeddings)
    verifier = None
    if options.verify:
        from kvc.compiler.verify import max_abs_diff

        verifier = max_abs_diff
    passes = default_passes(pipeline) + lowering_passes(options.engine.value)
    reports = run_passes(model, passes, options.dump_passes, verifier)
    for r in reports:
        progress(_format_report(r))
    cache = _cache_spec(model)
    with atomic_dir(output, overwrite=overwrite) as staging:
        if options.engine is EngineKind.ORT:
            from kvc.compiler.ort_build import build_ort

            entry_points, engine_options = build_ort(model, staging)
        else:
            from kvc.compiler.tvm_build import build_tvm

            entry_points, engine_options = build_tvm(model, staging, options, progress)
        copy_side_files(onnx_path.parent, staging)
        generation = _generation(onnx_path.parent, model)
        manifest = write_manifest(staging, engine=options.engine.value, target=options.device.value,
                                  model=config.to_dict(), cache=cache, entry_points=entry_points,
                                  passes=[r.to_dict() for r in reports], generation=generation,
                                  engine_options=engine_options)
    return CompileResult(manifest, reports, config_source)


def _format_report(r: PassReport) -> str:
    line = f"pass {r.name}: {r.matched} match{'es' if r.matched != 1 else ''}"
    if r.max_abs_diff is not None:
        line += f", max |diff| vs previous graph {r.max_abs_diff:.2e}"
    return "\n  ".join([line] + r.notes)


def _cache_spec(model: ir.Model) -> CacheSpec:
    """The cache as the passes left it (their layout metadata is the single source of truth)."""
    from kvc.passes.kv_layout import KvCacheLayout

    layout = KvCacheLayout.read_from(model)
    return CacheSpec(layout="ring", capacity=layout.capacity, dtype=layout.dtype.value, scales=layout.scales.value,
                     num_layers=layout.num_layers, num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim,
                     sliding_window=layout.sliding_window)


def _read_scales(path: Path | None) -> dict | None:
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise KvcError(f"cannot read KV scales from {path} ({exc}); produce them with kvc calibrate") from None


def _generation(model_dir: Path, model: ir.Model) -> dict:
    path = model_dir / "generation_config.json"
    if path.is_file():
        return json.loads(path.read_text())
    raw = model.metadata_props.get("kvc.generation")
    return json.loads(raw) if raw else {}
