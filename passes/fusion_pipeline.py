"""The fusion phase of kvc's pass pipeline: canonicalize, positions, RMSNorm, RoPE, attention, then the pasts'
shape reads and the sizes computed from the past length.

Order matters: positions computed in-graph from the past length become position_ids before the RoPE fusion,
so it can read cos/sin tables by them. RoPE and RMSNorm fusions leave the attention inputs as plain tensors, and
the attention fusion runs after them because the KV ring-buffer pass that follows this phase rewrites the
Attention nodes' past/present inputs and outputs. The past shape reads, and sizes computed from them, are
rebuilt from other inputs after it: the attention fusion's head-repeat probes rely on the pasts' own
symbolic sizes, which the exporters do not tie to attention_mask's.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from kvc.passes.base import KvcPass, PassReport
from kvc.passes.canonicalize import CanonicalizePass
from kvc.passes.fuse_attention import FuseAttentionPass
from kvc.passes.fuse_rms_norm import FuseRmsNormPass
from kvc.passes.fuse_rotary import FuseRotaryPass
from kvc.passes.import_ort_genai import ImportOrtGenaiPass
from kvc.passes.length_uses import LengthUsesFromInputsPass, PositionsFromInputsPass
from kvc.passes.past_shapes import PastShapesFromInputsPass

FUSION_PASSES: list[type[KvcPass]] = [ImportOrtGenaiPass, CanonicalizePass, PositionsFromInputsPass, FuseRmsNormPass,
                                      FuseRotaryPass, FuseAttentionPass, PastShapesFromInputsPass,
                                      LengthUsesFromInputsPass]


@dataclass(frozen=True)
class FusionOptions:
    #: Rows of the cos/sin caches materialised for in-graph RoPE. None: read it from the kvc
    #: model config in the graph's metadata; without either, cos/sin stay computed in-graph.
    max_positions: int | None = None


def build_fusion_passes(options: FusionOptions = FusionOptions()) -> list[KvcPass]:
    passes: list[KvcPass] = []
    for cls in FUSION_PASSES:
        positional = cls in (PositionsFromInputsPass, FuseRotaryPass, LengthUsesFromInputsPass)
        passes.append(cls(max_positions=options.max_positions) if positional else cls())
    return passes


def run_fusions(model: ir.Model, options: FusionOptions = FusionOptions()) -> list[PassReport]:
    """Run the fusion passes in place, in order; one report per pass."""
    reports = []
    for fusion in build_fusion_passes(options):
        fusion(model)
        reports.append(fusion.report)
    return reports
