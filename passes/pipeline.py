"""The ordered default pipeline: canonicalize -> fuse RMSNorm / RoPE / attention -> KV ring buffer
-> KV quantization. Optionally dumps the graph after each pass and verifies each I/O-preserving
pass against its input with ONNX Runtime on random inputs."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import onnx_ir as ir

from kvc.passes.base import KvcPass, PassReport


@dataclass(frozen=True)
class PipelineOptions:
    capacity: int
    kv_dtype: str = "fp32"
    sliding_window: Optional[int] = None
    fp8_scales: Optional[dict] = None  # {"key": [[per kv head] per layer], "value": ...} from kvc calibrate
    max_positions: Optional[int] = None  # rows of materialised RoPE caches (the model's max positions)


def default_passes(options: PipelineOptions) -> list[KvcPass]:
    from kvc.passes.fusion_pipeline import FusionOptions, build_fusion_passes
    from kvc.passes.kv_layout import Fp8Scales, KvQuantOptions, RingBufferOptions, parse_kv_dtype
    from kvc.passes.kv_quantize import KvQuantizePass
    from kvc.passes.kv_ring_buffer import KvRingBufferPass

    passes = build_fusion_passes(FusionOptions(max_positions=options.max_positions))
    passes.append(KvRingBufferPass(RingBufferOptions(capacity=options.capacity,
                                                     sliding_window=options.sliding_window)))
    dtype = parse_kv_dtype(options.kv_dtype)
    scales = Fp8Scales.from_dict(options.fp8_scales) if options.fp8_scales is not None else None
    passes.append(KvQuantizePass(KvQuantOptions(dtype=dtype, fp8_scales=scales)))
    return passes


def lowering_passes(engine: str) -> list[KvcPass]:
    """Engine-specific lowering ("ort" | "tvm"), run after the neutral passes by the same runner."""
    if engine == "ort":
        from kvc.passes.fold_reshape_shapes import FoldReshapeShapesPass
        from kvc.passes.lower_ort_live_slots import LowerOrtLiveSlotsPass
        from kvc.passes.lower_ort_pack_projections import LowerOrtPackProjectionsPass

        # fewer nodes per step first (shape inference still sees the static capacity), then live slots
        return [FoldReshapeShapesPass(), LowerOrtPackProjectionsPass(), LowerOrtLiveSlotsPass()]
    return []


Verifier = Callable[[ir.Model, ir.Model], float]


def run_passes(model: ir.Model, passes: list[KvcPass], dump_dir: Path | None = None,
               verifier: Verifier | None = None) -> list[PassReport]:
    """Apply ``passes`` in order (in place); return one report per pass."""
    reports = []
    if dump_dir is not None:
        dump_dir.mkdir(parents=True, exist_ok=True)
        _dump(model, dump_dir / "00_input.onnx")
    for index, p in enumerate(passes, start=1):
        before = _clone(model) if verifier is not None and not p.changes_io else None
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
