"""Plain torch.onnx.export graphs of transformers models (TorchScript and dynamo exporters, opset 18, past
KV as explicit inputs/outputs: tests/passes/_hf_exports.py) -> kvc compile, with no config.json beside
the graph -> 32 greedy tokens equal transformers' generate on 3 prompts, two of them longer than Mistral's
8-token window (a window the graph applies by cropping its caches, read from the graph); ORT engine for
every (architecture, exporter) of llama / qwen2 / mistral / gpt2 / qwen3 / phi3 / gemma / olmo2 / granite /
stablelm / smollm3; gemma2's alternating windows within the narrowest; the TVM engine on both exporters' Llama,
Mistral (its window) and GPT-2 (flattened Conv1D rows) graphs and on TorchScript Phi-3 (fused qkv, partial
rotary); fused-op counts. Plus the refusals these graphs can meet."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
import onnx_ir as ir
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from greedy_tokens import PROMPTS, hf_greedy, kvc_greedy  # noqa: E402  (tests/passes is on sys.path)

import _hf_exports  # noqa: E402  (tests/passes is on sys.path: conftest imports it too)

CAPACITY = 64
CASES = [(arch, exporter) for exporter in _hf_exports.EXPORTERS for arch in _hf_exports.ARCHS]
FAMILY_CASES = [(arch, exporter) for exporter in _hf_exports.EXPORTERS for arch in _hf_exports.MORE_FAMILIES
                if arch != "gemma2"]
# TVM on a subset (each case ~20-30 s): every graph form TVM's importer met differently (TorchScript's computed
# Reshape targets with a -1 head count, GPT-2's flattened rows, the dynamo exporter's named sequence dim that
# the decode entry fixes, a window) on both exporters, and one family with fused projections.
TVM_CASES = [("llama", "torchscript"), ("mistral", "torchscript"), ("gpt2", "torchscript"), ("phi3", "torchscript"),
             ("llama", "dynamo"), ("mistral", "dynamo"), ("gpt2", "dynamo")]


def _compile(path: Path, out: Path, engine: str = "ort", **overrides):
    from kvc.compiler.options import CompileOptions, Device, EngineKind
    from kvc.compiler.pipeline import compile_model

    overrides.setdefault("max_seq_len", CAPACITY)
    options = CompileOptions(engine=EngineKind(engine), device=Device("cpu"), **overrides)
    return compile_model(path, out, options, progress=lambda *_: None)


def _graph(artifact: Path) -> onnx.GraphProto:
    return onnx.load(str(artifact / "graph.onnx"), load_external_data=False).graph


def _assert_tokens_equal_transformers(arch: str, artifact: Path) -> None:
    hf = _hf_exports.tiny_hf_model(arch)
    for prompt in PROMPTS:
        assert kvc_greedy(artifact, prompt) == hf_greedy(hf, prompt), (arch, prompt)


@pytest.mark.parametrize("arch, exporter", CASES)
def test_ort_engine_tokens_equal_transformers(hf_export, arch, exporter, tmp_path):
    export = hf_export(arch, exporter)
    result = _compile(export.path, tmp_path / "out.kvc")
    graph = _graph(tmp_path / "out.kvc")
    counts = Counter(n.op_type for n in graph.node)
    layers = export.num_layers
    assert counts["Attention"] == layers and counts["TensorScatter"] == 2 * layers and counts["Softmax"] == 0, counts
    if export.is_llama_family:
        assert counts["RotaryEmbedding"] == 2 * layers and counts["RMSNormalization"] == 2 * layers + 1, counts
    window = _hf_exports.MISTRAL_WINDOW if arch == "mistral" else None
    assert result.manifest.cache.sliding_window == window
    _assert_tokens_equal_transformers(arch, tmp_path / "out.kvc")


@pytest.mark.parametrize("arch, exporter", FAMILY_CASES)
def test_more_families_tokens_equal_transformers(hf_export, arch, exporter, tmp_path):
    export = hf_export(arch, exporter)
    _compile(export.path, tmp_path / "out.kvc")
    counts = Counter(n.op_type for n in _graph(tmp_path / "out.kvc").node)
    assert counts["Attention"] == export.num_layers and counts["Softmax"] == 0, counts
    _assert_tokens_equal_transformers(arch, tmp_path / "out.kvc")


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_alternating_windows_compile_per_layer(hf_export, exporter, tmp_path):
    """Gemma2 (window 8 on even layers, full attention on odd ones): the windows are read per layer from the
    graph and the ring applies each layer's own (one mask per window) at a capacity of 64, 8 times the window:
    transformers' tokens on prompts that cross the window. The TorchScript export itself fails on ONNX Runtime
    past 8 tokens (a traced Concat in transformers' sliding cache), so kvc compile's check against it refuses,
    naming that; with --no-check the ring form runs past the window and gives transformers' tokens."""
    from kvc.errors import GraphError

    export = hf_export("gemma2", exporter)
    check = exporter == "dynamo"
    if not check:
        with pytest.raises(GraphError, match="the original graph fails on ONNX Runtime CPU after 8 tokens"):
            _compile(export.path, tmp_path / "checked.kvc")
        assert not (tmp_path / "checked.kvc").exists()
    result = _compile(export.path, tmp_path / "out.kvc", check=check)
    assert result.manifest.cache.sliding_window is None and result.manifest.cache.layer_windows == (8, None)
    assert "per-layer windows [8, None]" in " ".join(n for r in result.reports if r.name == "kv_ring_buffer"
                                                     for n in r.notes)
    _assert_tokens_equal_transformers("gemma2", tmp_path / "out.kvc")


@pytest.mark.parametrize("arch, exporter", TVM_CASES)
def test_tvm_engine_tokens_equal_transformers(hf_export, arch, exporter, tmp_path):
    export = hf_export(arch, exporter)
    result = _compile(export.path, tmp_path / "out.kvc", engine="tvm")
    assert result.manifest.cache.sliding_window == (_hf_exports.MISTRAL_WINDOW if arch == "mistral" else None)
    _assert_tokens_equal_transformers(arch, tmp_path / "out.kvc")


# --- refusals ------------------------------------------------------------------------------------

def test_window_other_than_the_graphs_is_refused(hf_export):
    from kvc.compiler.options import CompileOptions
    from kvc.compiler.model_description import describe_model
    from kvc.errors import GraphError

    export = hf_export("mistral", "torchscript")
    model = ir.load(export.path)
    described = describe_model(model, export.path.parent, CompileOptions(max_seq_len=CAPACITY))
    assert described.sliding_window == described.original_window == _hf_exports.MISTRAL_WINDOW
    config = _hf_exports.tiny_hf_model("mistral").config
    config.sliding_window = 16
    config.to_json_file(export.path.parent / "config.json")
    try:
        with pytest.raises(GraphError, match=r"says sliding window\(s\) 16 but the graph crops its caches to windows of 8"):
            describe_model(model, export.path.parent, CompileOptions(max_seq_len=CAPACITY))
    finally:
        (export.path.parent / "config.json").unlink()


def test_ring_pass_refuses_a_window_the_crops_contradict(hf_export):
    """The pass alone (an API user who skips the model description): the crop's window must be asked for."""
    from kvc.errors import GraphError
    from kvc.passes.fusion_pipeline import run_fusions
    from kvc.passes.kv_layout import RingBufferOptions
    from kvc.passes.kv_ring_buffer import KvRingBufferPass

    model = ir.load(hf_export("mistral", "torchscript").path)
    run_fusions(model)
    with pytest.raises(GraphError, match=r"keeps the last 7 cached positions .* compile with --sliding-window 8"):
        KvRingBufferPass(RingBufferOptions(capacity=CAPACITY))(model)


def test_live_past_length_read_is_refused_by_name(hf_export):
    """A past-length read that feeds more than the mask (here: added to the logits) cannot come from a ring:
    the past-shapes pass rebuilds it from attention_mask, which the ring pass then names."""
    from kvc.errors import GraphError
    from kvc.passes.fusion_pipeline import run_fusions
    from kvc.passes.kv_layout import RingBufferOptions
    from kvc.passes.kv_ring_buffer import KvRingBufferPass

    model = ir.load(hf_export("llama", "torchscript").path)
    graph = model.graph
    past = next(v for v in graph.inputs if v.name == "past_key_values.0.key")
    logits = graph.outputs[0]
    tape = ir.tape.Tape(graph)
    length = tape.op("Cast", [tape.op("Shape", [past], {"start": 2, "end": 3})], {"to": ir.DataType.FLOAT})
    shifted = tape.op("Add", [logits.producer().outputs[0], length])
    graph.outputs[0] = shifted
    shifted.name, logits.name = "logits", "logits_before"
    run_fusions(model)
    with pytest.raises(GraphError, match="attention_mask is used by Shape node"):
        KvRingBufferPass(RingBufferOptions(capacity=CAPACITY))(model)


def test_inferred_config_reads_gpt2_embedding_and_position_table(hf_export):
    """No config.json: GPT-2's export flattens input_ids before the embedding Gather, and its learned position
    table bounds the context (a capacity past it would index outside the table)."""
    from kvc.compiler.model_description import infer_config

    config = infer_config(ir.load(hf_export("gpt2", "torchscript").path))
    assert (config.vocab_size, config.hidden_size, config.max_position_embeddings) == (128, 64, 256)
