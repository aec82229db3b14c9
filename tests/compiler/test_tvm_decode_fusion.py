"""Decode-only operator fusion: decode's kernels are fused, prefill's and kvc's own kernels are not."""
from __future__ import annotations

import pytest

pytest.importorskip("tvm")


def legalized_entry_points(exported, kv_dtype: str):
    import tvm
    from tvm import relax

    from kvc.compiler.tvm.engine_build import import_entry_points
    from kvc.contract import EngineKind
    from kvc.passes.graph_checks import load_model_checked
    from kvc.passes.pipeline import PipelineOptions, default_passes, lowering_passes, run_passes

    _, config, onnx_path = exported("tiny")
    model = load_model_checked(onnx_path)
    run_passes(model, default_passes(PipelineOptions(capacity=32, kv_dtype=kv_dtype,
                                                     max_positions=config.max_position_embeddings))
               + lowering_passes(EngineKind.TVM))
    mod, _, _ = import_entry_points(model)
    with tvm.target.Target({"kind": "llvm"}):
        return relax.transform.LegalizeOps()(mod)


def kernels_called(mod, entry: str) -> set[str]:
    from tvm import relax

    return {gv.name_hint for gv in relax.analysis.all_global_vars(mod[entry])}


@pytest.mark.parametrize("kv_dtype", ["fp32", "fp8"])
def test_only_decode_is_fused_and_kvc_kernels_stay_whole(exported, kv_dtype):
    from kvc.compiler.tvm.decode_fusion import fuse_decode

    mod = legalized_entry_points(exported, kv_dtype)
    prefill_before = kernels_called(mod, "prefill")
    fused = fuse_decode(mod)
    decode_kernels = kernels_called(fused, "decode")
    assert len(decode_kernels) < len(kernels_called(mod, "decode"))
    # epilogues joined the weight matmuls (ai.kvc PackedMatMul kernels)
    assert any(name.startswith("fused_") and "kvc_packed_matmul" in name for name in decode_kernels)
    assert kernels_called(fused, "prefill") == prefill_before
    assert not any(name.startswith("fused_") for name in prefill_before)
    # kvc's attention kernels and float8 codecs are called as they are, never merged into others
    own = [n for n in decode_kernels if "attention" in n or "float8" in n]
    assert any("decode_attention_partial" in n for n in own)
    assert not any(n.startswith("fused_") for n in own)
