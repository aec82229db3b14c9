"""The fusion pipeline on kvc's own tiny models, exported by kvc (TorchScript) and by torch's dynamo
exporter: every layer fused, the Attention nodes in the form the KV ring buffer expects, and the
outputs unchanged in ONNX Runtime for prefill (empty past) and decode (past > 0)."""
from __future__ import annotations

import functools

import numpy as np
import onnx_ir as ir
import pytest

from kvc.passes.fusion_pipeline import FUSION_PASSES, FusionOptions, run_fusions

PRESETS = ["tiny", "tiny-qwen2", "tiny-mistral", "tiny-gpt2"]


@functools.lru_cache(maxsize=None)
def fused_copy(path, max_positions: int):
    """The fused model and its reports (cached: the tests only read them); RoPE tables of
    ``max_positions`` rows, as the compiler's model description says for kvc exports."""
    model = ir.load(path)
    reports = run_fusions(model, FusionOptions(max_positions=max_positions))
    return model, {r.name: r for r in reports}


def expected_counts(config) -> dict[str, int]:
    layers = config.num_layers
    if config.family.value == "gpt2":
        return {"Attention": layers, "RMSNormalization": 0, "RotaryEmbedding": 0,
                "LayerNormalization": 2 * layers + 1, "Softmax": 0}
    return {"Attention": layers, "RMSNormalization": 2 * layers + 1, "RotaryEmbedding": 2 * layers, "Softmax": 0}


def check_outputs_unchanged(kit, config, path, model, seed):
    rng = np.random.default_rng(seed)
    before, after = kit.ort_session(path), kit.ort_session(model)
    names = [o.name for o in before.get_outputs()]
    assert names == [o.name for o in after.get_outputs()]
    dims = dict(num_layers=config.num_layers, kv_heads=config.num_kv_heads, head_dim=config.resolved_head_dim,
                vocab=config.vocab_size)
    for past, seq, left_pad in ((0, 5, 2), (6, 1, 3), (4, 3, 0)):  # prefill, decode, chunked prefill
        feeds = kit.decoder_feeds(rng, batch=2, seq=seq, past=past, left_pad=left_pad, **dims)
        kit.assert_same_outputs(before.run(None, feeds), after.run(None, feeds), names, feeds["attention_mask"])


@pytest.mark.parametrize("preset", PRESETS)
def test_kvc_export_fuses_every_layer_and_keeps_outputs(kit, kvc_export, preset):
    config, path = kvc_export(preset, "torchscript")
    model, reports = fused_copy(path, config.max_position_embeddings)
    counts = kit.op_counts(model)
    for op, n in expected_counts(config).items():
        assert counts[op] == n, (op, counts)
    assert reports["attention"].matched == config.num_layers
    assert not [n for r in reports.values() for n in r.notes if "not fused" in n]
    check_outputs_unchanged(kit, config, path, model, seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny"])  # ~25 s per torch.export; GPT-2 dynamo runs in the HF tests
def test_dynamo_export_fuses_every_layer_and_keeps_outputs(kit, kvc_export, preset):
    config, path = kvc_export(preset, "dynamo")
    model, _ = fused_copy(path, config.max_position_embeddings)
    counts = kit.op_counts(model)
    for op, n in expected_counts(config).items():
        assert counts[op] == n, (op, counts)
    check_outputs_unchanged(kit, config, path, model, seed=2)


def test_attention_takes_past_and_produces_the_present_outputs(kvc_export):
    """The contract the KV ring-buffer pass relies on."""
    config, path = kvc_export("tiny", "torchscript")
    model, _ = fused_copy(path, config.max_position_embeddings)
    inputs = {v.name: v for v in model.graph.inputs}
    outputs = {v.name: v for v in model.graph.outputs}
    attentions = [n for n in model.graph if n.op_type == "Attention"]
    for layer, node in enumerate(sorted(attentions, key=lambda n: n.inputs[4].name)):
        assert len(node.inputs) == 6 and len(node.outputs) == 3
        q, k, v, mask, past_key, past_value = node.inputs
        assert past_key is inputs[f"past_key_values.{layer}.key"]
        assert past_value is inputs[f"past_key_values.{layer}.value"]
        assert node.outputs[1] is outputs[f"present.{layer}.key"]
        assert node.outputs[2] is outputs[f"present.{layer}.value"]
        assert k.producer().op_type == "RotaryEmbedding"  # the new key, after RoPE
        assert [q.shape[1], k.shape[1] if k.shape else config.num_kv_heads] == [config.num_heads, config.num_kv_heads]
        assert mask.dtype == ir.DataType.FLOAT and mask.shape is not None and mask.shape.rank() == 4
        assert node.attributes["scale"].as_float() == pytest.approx(config.resolved_head_dim ** -0.5)


def test_rotary_reads_a_materialised_cache_by_position_ids(kvc_export):
    config, path = kvc_export("tiny", "torchscript")
    model, reports = fused_copy(path, config.max_position_embeddings)
    ropes = [n for n in model.graph if n.op_type == "RotaryEmbedding"]
    caches = {n.inputs[1] for n in ropes}
    assert len(caches) == 1  # one table shared by all layers
    (cache,) = caches
    assert cache.const_value is not None
    assert list(cache.shape) == [config.max_position_embeddings, config.resolved_head_dim // 2]
    assert all(n.inputs[3].name == "position_ids" for n in ropes)
    assert reports["rotary"].notes == ["4 of 4 read cos/sin caches by position_ids"]


def test_pipeline_order_and_reports(kvc_export):
    assert [p.name for p in FUSION_PASSES] == ["import_ort_genai", "canonicalize", "positions", "rms_norm", "rotary",
                                               "attention", "past_shapes", "length_uses"]
    _, path = kvc_export("tiny-gpt2", "torchscript")
    model = ir.load(path)
    reports = run_fusions(model)  # a fresh run: the cached ones share reports
    assert [r.name for r in reports] == ["import_ort_genai", "canonicalize", "positions", "rms_norm", "rotary",
                                         "attention", "past_shapes", "length_uses"]
    assert reports[0].matched == 0 and not reports[0].changed_graph  # no contrib ops: nothing to import
    reports = reports[1:]
    assert model.opset_imports[""] == 23 and model.ir_version >= 10
    assert any(n.startswith("opset 18 -> 23") for n in reports[0].notes)
    assert [r.matched for r in reports[1:]] == [0, 0, 0, 2, 0, 0]  # kvc graphs read no cache shapes or lengths
