"""ORT lowering passes that only remove work (fold_reshape_shapes, lower_ort_pack_projections): the
compiled model computes the same logits with and without each (ORT engine, fp32, prefill + decode,
atol 1e-4 on logits of magnitude ~1), and the graph has the expected fewer nodes."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

from kvc.passes import pipeline
from kvc.runtime import load

LAYERS = 2  # every tiny preset


def compile_tiny(exported, tmp_path, monkeypatch, preset: str, without: str | None):
    from kvc.compiler import pipeline as compile_pipeline
    from kvc.compiler.options import CompileOptions

    _, _, onnx_path = exported(preset)
    out = tmp_path / f"{preset}-without-{without}.kvc"
    with monkeypatch.context() as patch:
        lowering = [p for p in pipeline.lowering_passes("ort") if p.name != without]
        patch.setattr(compile_pipeline, "lowering_passes", lambda engine: lowering)
        compile_pipeline.compile_model(onnx_path, out, CompileOptions(max_seq_len=64), progress=lambda *_: None)
    return out


def op_counts(artifact) -> Counter:
    graph = onnx.load(str(artifact / "graph.onnx"), load_external_data=False).graph
    return Counter(n.op_type for n in graph.node)


def assert_same_logits(plain, lowered) -> None:
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 256, (2, 9))
    a, b = load(plain, max_batch=2), load(lowered, max_batch=2)
    np.testing.assert_allclose(b.prefill(ids), a.prefill(ids), atol=1e-4, rtol=0)
    for step in range(4):
        tokens, past = rng.integers(0, 256, 2), np.full(2, 9 + step)
        np.testing.assert_allclose(b.decode(tokens, past), a.decode(tokens, past), atol=1e-4, rtol=0)


@pytest.mark.parametrize("preset, packed_away", [("tiny", 3), ("tiny-qwen2", 3), ("tiny-gpt2", 0)])
def test_packed_projections_fewer_matmuls_same_logits(exported, tmp_path, monkeypatch, preset, packed_away):
    """q/k/v -> 1 and gate/up -> 1 per Llama layer (3 MatMuls fewer); GPT-2's c_attn is packed already."""
    plain = compile_tiny(exported, tmp_path, monkeypatch, preset, "lower_ort_pack_projections")
    packed = compile_tiny(exported, tmp_path, monkeypatch, preset, None)
    before, after = op_counts(plain), op_counts(packed)
    assert before["MatMul"] - after["MatMul"] == LAYERS * packed_away
    assert after["Split"] - before["Split"] == (LAYERS * 2 if packed_away else 0)
    assert_same_logits(plain, packed)


@pytest.mark.parametrize("preset", ["tiny", "tiny-mistral", "tiny-gpt2"])
def test_folded_reshape_targets_remove_the_shape_plumbing_same_logits(exported, tmp_path, monkeypatch, preset):
    plain = compile_tiny(exported, tmp_path, monkeypatch, preset, "fold_reshape_shapes")
    folded = compile_tiny(exported, tmp_path, monkeypatch, preset, None)
    before, after = op_counts(plain), op_counts(folded)
    assert after["Reshape"] == before["Reshape"]  # same reshapes, constant targets
    assert after["Concat"] < before["Concat"] and after["Unsqueeze"] < before["Unsqueeze"]
    graph = onnx.load(str(folded / "graph.onnx"), load_external_data=False).graph
    constants = {i.name for i in graph.initializer}
    assert all(n.input[1] in constants for n in graph.node if n.op_type == "Reshape")
    assert_same_logits(plain, folded)
