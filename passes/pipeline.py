"""The ordered pipeline: neutral passes (canonicalize -> fuse RMSNorm / RoPE / attention -> KV ring buffer
-> KV quantization), then one engine's lowering passes, all run by ``run_passes``, which reports each,
optionally dumps the graph after each (numbered) and verifies each I/O-preserving pass against its
input with ONNX Runtime on random inputs. Passes take typed options only: what the model is (its
window, its max positions) is resolved before, by kvc.compiler.model_description."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import onnx_ir as ir

from kvc.contract import EngineKind, Entry, KvDtype, WeightDtype
from kvc.passes.base import KvcPass, PassReport
from kvc.passes.kv_layout import Fp8Scales
from kvc.passes.weight_quantize import WeightQuantOptions


@dataclass(frozen=True)
class PipelineOptions:
    capacity: int
    kv_dtype: KvDtype = KvDtype.FP32
    sliding_window: Optional[int] = None  # the model's attention window (None: full attention)
    layer_windows: tuple[Optional[int], ...] = ()  # per layer where the layers differ (then sliding_window is None)
    fp8_scales: Optional[Fp8Scales] = None  # static fp8 scales from kvc calibrate (None: dynamic)
    max_positions: Optional[int] = None  # rows of materialised RoPE caches (the model's max positions)
    weights: WeightQuantOptions = WeightQuantOptions()  # weight storage (fp32: the pass does nothing)


def default_passes(options: PipelineOptions) -> list[KvcPass]:
    """The engine-neutral passes, in order."""
    from kvc.passes.fusion_pipeline import FusionOptions, build_fusion_passes
    from kvc.passes.kv_layout import KvQuantOptions, RingBufferOptions
    from kvc.passes.kv_quantize import KvQuantizePass
    from kvc.passes.kv_ring_buffer import KvRingBufferPass

    passes = build_fusion_passes(FusionOptions(max_positions=options.max_positions))
    passes.append(KvRingBufferPass(RingBufferOptions(capacity=options.capacity, sliding_window=options.sliding_window,
                                                     layer_windows=options.layer_windows)))
    passes.append(KvQuantizePass(KvQuantOptions(dtype=KvDtype(options.kv_dtype), fp8_scales=options.fp8_scales)))
    if options.weights.dtype is not WeightDtype.FP32:
        from kvc.passes.weight_quantize import WeightQuantizePass

        passes.append(WeightQuantizePass(options.weights))
    return passes


def lowering_passes(engine: EngineKind | str) -> list[KvcPass]:
    """One engine's lowering, run after the neutral passes by the same runner."""
    if EngineKind(engine) is EngineKind.ORT:
        from kvc.passes.fold_reshape_shapes import FoldReshapeShapesPass
        from kvc.passes.lower_ort_fp8_scatter import LowerOrtFp8ScatterPass
        from kvc.passes.lower_ort_live_slots import LowerOrtLiveSlotsPass
        from kvc.passes.lower_ort_matmul_nbits import LowerOrtMatMulNBitsPass
        from kvc.passes.lower_ort_pack_projections import LowerOrtPackProjectionsPass

        # fewer nodes per step first (shape inference still sees the static capacity), then live slots
        # MatMulNBits last: ONNX shape inference (which the others run) does not know contrib ops
        return [FoldReshapeShapesPass(), LowerOrtPackProjectionsPass(), LowerOrtFp8ScatterPass(),
                LowerOrtLiveSlotsPass(), LowerOrtMatMulNBitsPass()]
    from kvc.passes.fold_reshape_shapes import FoldReshapeShapesPass
    from kvc.passes.lower_tvm_cache_attention import LowerTvmCacheAttentionPass
    from kvc.passes.lower_tvm_outer_products import LowerTvmOuterProductsPass
    from kvc.passes.lower_tvm_quantized_writes import LowerTvmQuantizedWritesPass
    from kvc.passes.lower_tvm_static_reshapes import LowerTvmStaticReshapesPass

    return [FoldReshapeShapesPass(), LowerTvmStaticReshapesPass(), LowerTvmOuterProductsPass(),
            LowerTvmCacheAttentionPass(), LowerTvmQuantizedWritesPass()]  # weights: per entry, last


def entry_lowering_passes(engine: EngineKind | str) -> dict[Entry, list[KvcPass]]:
    """Per entry point: passes that specialize a copy of the lowered graph for that entry (TVM imports
    the graph once per entry; the ORT engine runs one graph for all)."""
    if EngineKind(engine) is EngineKind.ORT:
        return {}
    from kvc.passes.lower_tvm_decode_entry import DECODE_BATCH, LowerTvmDecodeEntryPass
    from kvc.passes.lower_tvm_weight_codes import LowerTvmWeightCodesPass

    # Weights packed last, in every entry: ONNX shape inference (which the decode passes' folding runs)
    # cannot see through ai.kvc PackedMatMul. The entries pack the same weights under the same names.
    return {entry: ([LowerTvmDecodeEntryPass(entry)] if entry in DECODE_BATCH else []) + [LowerTvmWeightCodesPass()]
            for entry in Entry}


def lower_entries(model: ir.Model, engine: EngineKind | str, dump_dir: Path | None = None,
                  first_index: int = 1) -> tuple[dict[Entry, ir.Model], list[PassReport]]:
    """The graph each entry point builds (``model`` itself where no entry pass applies; a specialized
    copy otherwise, ``model`` unchanged) and the entry passes' reports; dumps are numbered from
    ``first_index`` (one after the graph-wide passes' dumps)."""
    graphs: dict[Entry, ir.Model] = {}
    reports: list[PassReport] = []
    per_entry = entry_lowering_passes(engine)
    for entry in Entry:
        passes = per_entry.get(entry, [])
        if not passes:
            graphs[entry] = model
            continue
        graphs[entry] = _clone(model)
        entry_reports = run_passes(graphs[entry], passes, dump_dir, first_index=first_index + len(reports))
        for report in entry_reports:
            report.entry = entry.value
        reports += entry_reports
    return graphs, reports


Verifier = Callable[[ir.Model, ir.Model], float]


def run_passes(model: ir.Model, passes: list[KvcPass], dump_dir: Path | None = None,
               verifier: Verifier | None = None, first_index: int = 1) -> list[PassReport]:
    """Apply ``passes`` in order (in place); return one report per pass. Dumps are numbered from
    ``first_index``; the input is dumped too (as 00) when the numbering starts at 1."""
    reports = []
    if dump_dir is not None:
        dump_dir.mkdir(parents=True, exist_ok=True)
        if first_index == 1:
            _dump(model, dump_dir / "00_input.onnx")
    for index, p in enumerate(passes, start=first_index):
        before = _clone(model) if verifier is not None and not p.changes_io and p.ort_runnable else None
        p(model)
        report = p.report
        if before is not None:
            report.max_abs_diff = verifier(before, model)
        reports.append(report)
        if dump_dir is not None:
            _dump(model, dump_dir / f"{index:02d}_{p.name}.onnx")
    return reports


def _clone(model: ir.Model) -> ir.Model:
    return ir.from_proto(ir.to_proto(model))


def _dump(model: ir.Model, path: Path) -> None:
    ir.save(model, path, external_data=path.name + ".data" if _weights_bytes(model) > (1 << 30) else None)


def _weights_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
