"""lower_tvm_cache_attention: every ring-buffer Attention of a kvc graph becomes ai.kvc CacheAttention
reading the stored cache, with the codec's scale layout; the decoders go; other attention stays.
(That the TVM engine computes the same as ONNX Runtime on the result, kernels on and off, is
tests/compiler/test_tvm_import.py.)"""
from __future__ import annotations

import onnx_ir as ir
import pytest

from kvc.contract import CACHE_ATTENTION_OP, KVC_DOMAIN, KvDtype
from kvc.passes.lower_tvm_cache_attention import LowerTvmCacheAttentionPass
from kvc.passes.pipeline import PipelineOptions, default_passes, run_passes

LAYERS = 2  # the tiny preset
EXPECTED = {KvDtype.FP32: (ir.DataType.FLOAT, "none"), KvDtype.FP16: (ir.DataType.FLOAT16, "none"),
            KvDtype.INT8: (ir.DataType.INT8, "per_token"), KvDtype.FP8: (ir.DataType.FLOAT8E4M3FN, "per_token")}


def ring_graph(exported, kv_dtype: KvDtype, **options) -> ir.Model:
    _, _, path = exported("tiny")
    model = ir.load(path)
    run_passes(model, default_passes(PipelineOptions(capacity=16, kv_dtype=kv_dtype, **options)))
    return model


def ops(model: ir.Model) -> list[tuple[str, str]]:
    return [(n.domain, n.op_type) for n in model.graph]


@pytest.mark.parametrize("kv_dtype", list(EXPECTED))
def test_ring_attention_reads_the_stored_cache(exported, kv_dtype):
    model = ring_graph(exported, kv_dtype)
    pass_ = LowerTvmCacheAttentionPass()
    pass_(model)
    assert pass_.report.matched == LAYERS
    lowered = [n for n in model.graph if n.domain == KVC_DOMAIN]
    assert len(lowered) == LAYERS and all(n.op_type == CACHE_ATTENTION_OP for n in lowered)
    assert ("", "Attention") not in ops(model) and ("", "DequantizeLinear") not in ops(model)
    stored_dtype, layout = EXPECTED[kv_dtype]
    for node in lowered:
        assert node.attributes["scale_layout"].as_string() == layout
        assert node.inputs[1].dtype == stored_dtype and node.inputs[2].dtype == stored_dtype
        assert node.outputs[0].shape is not None  # the replaced Attention's shape is kept
        scales = [node.inputs[i] if i < len(node.inputs) else None for i in (5, 6)]
        assert [s is not None for s in scales] == [layout != "none"] * 2
    assert model.opset_imports[KVC_DOMAIN] == 1


def test_static_fp8_scales_are_per_head(exported):
    from kvc.passes.kv_layout import Fp8Scales

    scales = Fp8Scales(key=((0.5, 0.25),) * LAYERS, value=((0.125, 1.0),) * LAYERS)
    model = ring_graph(exported, KvDtype.FP8, fp8_scales=scales)
    LowerTvmCacheAttentionPass()(model)
    layouts = {n.attributes["scale_layout"].as_string() for n in model.graph if n.domain == KVC_DOMAIN}
    assert layouts == {"per_head"}


def test_attention_the_kernels_do_not_implement_is_left_with_a_reason(exported):
    model = ring_graph(exported, KvDtype.INT8)
    first = next(n for n in model.graph if n.op_type == "Attention")
    first.attributes["softcap"] = ir.AttrFloat32("softcap", 30.0)
    pass_ = LowerTvmCacheAttentionPass()
    pass_(model)
    assert pass_.report.matched == LAYERS - 1
    assert any("softcap" in note and first.name in note for note in pass_.report.notes)
    assert first in list(model.graph)  # untouched, its decoders kept
    assert ("", "DequantizeLinear") in ops(model)


def test_concat_attention_is_not_touched(exported):
    _, _, path = exported("tiny")
    model = ir.load(path)
    from kvc.passes.fusion_pipeline import FusionOptions, build_fusion_passes

    run_passes(model, build_fusion_passes(FusionOptions()))
    before = ops(model)
    pass_ = LowerTvmCacheAttentionPass()
    pass_(model)
    assert pass_.report.matched == 0 and ops(model) == before
    assert all("not the ring-buffer form" in note for note in pass_.report.notes)
