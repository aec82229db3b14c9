"""optimum-onnx exports (tests/data/optimum, made by make_fixtures.py with optimum-onnx 0.1.0 / transformers 4.57.6:
``optimum-cli export onnx --task text-generation-with-past`` of tiny seeded llama, qwen2, mistral with an 8- and a
48-token window, gpt2, qwen3, phi3, gemma, granite, olmo2, stablelm, smollm3; llama also in the merged
``use_cache_branch`` form).

* the fusion passes fold every attention with its past (the mask crop that made a cycle included) and the fused
  graph computes what the exporter's graph computes (ONNX Runtime, prefill + decode, past the 8-token window);
* the exporter's graph itself gives the reference tokens (transformers' generate in the side venv, reference.json);
* the ``kvc compile`` command builds the merged form and GPT-2;
* kvc compile -> 32 greedy tokens equal transformers' on 3 prompts (one past mistral's window), ORT engine on all,
  TVM on mistral_window8 and gemma (the Shape reads of the past are rebuilt by kvc.passes.past_shapes). Gemma is exported
  without position_ids and computes them from the past length: kvc.passes.length_uses makes them an input.
"""
from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

DATA = Path(__file__).resolve().parents[1] / "data" / "optimum"
CASES = ["llama", "qwen2", "mistral_window8", "mistral_window48", "gpt2", "llama_merged", "qwen3", "phi3", "gemma",
         "granite", "olmo2", "stablelm", "smollm3"]
CAPACITY = 64
NO_POSITION_IDS = ["gemma"]  # optimum exports Gemma without a position_ids input: the compiled graph gains one


@pytest.fixture(scope="session")
def unpacked(tmp_path_factory) -> dict[str, Path]:
    """Each fixture's model.onnx beside its config.json, as optimum writes them (checked in gzipped)."""
    root = tmp_path_factory.mktemp("optimum")
    paths = {}
    for name in CASES:
        folder = root / name
        folder.mkdir()
        (folder / "model.onnx").write_bytes(gzip.decompress((DATA / name / "model.onnx.gz").read_bytes()))
        (folder / "config.json").write_text((DATA / name / "config.json").read_text())
        paths[name] = folder / "model.onnx"
    return paths


def _config(name: str) -> dict:
    return json.loads((DATA / name / "config.json").read_text())


def _reference(name: str) -> dict:
    return json.loads((DATA / name / "reference.json").read_text())


def _dims(config: dict) -> tuple[int, int, int]:
    """layers, kv heads, head size."""
    if config["model_type"] == "gpt2":
        return config["n_layer"], config["n_head"], config["n_embd"] // config["n_head"]
    return config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"]


def _feeds(config: dict, rng: np.random.Generator, batch: int, seq: int, past: int) -> dict[str, np.ndarray]:
    layers, kv_heads, head_dim = _dims(config)
    feeds = {"input_ids": rng.integers(0, config["vocab_size"], (batch, seq)),
             "attention_mask": np.ones((batch, past + seq), np.int64),
             "position_ids": np.tile(np.arange(past, past + seq), (batch, 1)),
             "use_cache_branch": np.array([past > 0])}
    for layer in range(layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{layer}.{kind}"] = rng.standard_normal(
                (batch, kv_heads, past, head_dim)).astype(np.float32)
    return feeds  # each graph reads the ones it has (a fused Gemma gains position_ids)


def _run(kit, model, feeds: dict) -> dict[str, np.ndarray]:
    session = kit.ort_session(model)
    names = {i.name for i in session.get_inputs()}
    outputs = session.run(None, {k: v for k, v in feeds.items() if k in names})
    return dict(zip([o.name for o in session.get_outputs()], outputs))


@pytest.mark.parametrize("name", CASES)
def test_fusions_fold_every_attention_with_its_past_and_keep_the_graph_equal(name, kit, unpacked):
    from kvc.passes.fusion_pipeline import FusionOptions, run_fusions

    config = _config(name)
    layers, _, _ = _dims(config)
    model = ir.load(unpacked[name])
    reports = {r.name: r for r in run_fusions(model, FusionOptions(max_positions=config.get("max_position_embeddings",
                                                                                          config.get("n_positions"))))}
    counts = Counter(n.op_type for n in model.graph)
    attentions = [n for n in model.graph if n.op_type == "Attention"]
    assert len(attentions) == layers and all(len(n.inputs) == 6 for n in attentions), reports["attention"].notes
    assert counts["Softmax"] == 0 and counts["If"] == 0
    rotary_layers, norms = _expected_fusions(config)
    assert counts["RotaryEmbedding"] == 2 * rotary_layers and counts["RMSNormalization"] == norms, counts
    assert reports["attention"].notes[-1] == f"{layers} of {layers} take past_key/past_value"
    original = onnx.load(str(unpacked[name]))
    rng = np.random.default_rng(7)
    for batch, seq, past in ((2, 5, 0), (2, 1, 5), (1, 3, 10)):  # prefill, decode, a chunk past the 8-token window
        feeds = _feeds(config, rng, batch, seq, past)
        want, got = _run(kit, original, feeds), _run(kit, model, feeds)
        assert sorted(want) == sorted(got)
        for output, expected in want.items():
            np.testing.assert_allclose(got[output], expected, rtol=kit.rtol, atol=kit.atol, err_msg=output)


def _expected_fusions(config: dict) -> tuple[int, int]:
    """(layers with RoPE, RMSNorms) of a case: q/k norms add two per layer (qwen3, olmo2); StableLM and GPT-2 use
    LayerNorm; SmolLM3 skips RoPE on every other layer; GPT-2 has learned positions."""
    layers, _, _ = _dims(config)
    kind = config["model_type"]
    if kind == "gpt2":
        return 0, 0
    rotary = layers // config["no_rope_layer_interval"] * (config["no_rope_layer_interval"] - 1) \
        if kind == "smollm3" else layers
    norms = 0 if kind == "stablelm" else 4 * layers + 1 if kind in ("qwen3", "olmo2") else 2 * layers + 1
    return rotary, norms


def _graph_greedy(kit, path: Path, config: dict, prompt: list[int], new_tokens: int) -> list[int]:
    """optimum's own loop over the exported graph in ONNX Runtime: growing caches, full attention_mask."""
    session = kit.ort_session(path)
    layers, kv_heads, head_dim = _dims(config)
    caches = {f"past_key_values.{i}.{kind}": np.zeros((1, kv_heads, 0, head_dim), np.float32)
              for i in range(layers) for kind in ("key", "value")}
    ids, step, tokens = list(prompt), list(prompt), []
    names = {i.name for i in session.get_inputs()}
    for _ in range(new_tokens):
        past = len(ids) - len(step)
        feeds = {"input_ids": np.array([step]), "attention_mask": np.ones((1, len(ids)), np.int64),
                 "position_ids": np.arange(past, len(ids))[None], "use_cache_branch": np.array([past > 0]), **caches}
        outputs = dict(zip([o.name for o in session.get_outputs()],
                           session.run(None, {k: v for k, v in feeds.items() if k in names})))
        token = int(outputs["logits"][0, -1].argmax())
        tokens.append(token)
        ids.append(token)
        step = [token]
        caches = {k.replace("present.", "past_key_values."): v for k, v in outputs.items() if k.startswith("present.")}
    return tokens


@pytest.mark.parametrize("name", CASES)
def test_exported_graph_reproduces_the_reference_tokens(name, kit, unpacked):
    """The fixtures are what they claim: optimum's graph (its sliding window included) generates transformers'
    tokens, so the compiled engine can be held to reference.json."""
    reference = _reference(name)
    for prompt, tokens in zip(reference["prompts"], reference["tokens"]):
        assert _graph_greedy(kit, unpacked[name], _config(name), prompt, reference["new_tokens"]) == tokens, prompt


@pytest.mark.parametrize("name", ["gpt2", "llama_merged"])
def test_compile_command_builds(name, unpacked, tmp_path):
    from click.testing import CliRunner

    from kvc.cli.main import cli

    out = tmp_path / "out.kvc"
    result = CliRunner().invoke(cli, ["compile", str(unpacked[name]), "-o", str(out), "--max-seq-len", str(CAPACITY)])
    assert result.exit_code == 0, result.output
    assert (out / "manifest.json").exists()


# --- end to end: kvc compile -> kvc's greedy tokens == transformers' (reference.json) -------------------------

def _compile(path: Path, out: Path, engine: str = "ort"):
    from kvc.compiler.options import CompileOptions, Device, EngineKind
    from kvc.compiler.pipeline import compile_model

    return compile_model(path, out, CompileOptions(engine=EngineKind(engine), device=Device("cpu"),
                                                   max_seq_len=CAPACITY), progress=lambda *_: None)


def _assert_tokens_equal_reference(name: str, artifact: Path) -> None:
    from kvc.runtime import load
    from kvc.runtime.sampling import SamplingParams

    reference = _reference(name)
    model = load(artifact)
    params = SamplingParams(temperature=0.0, max_new_tokens=reference["new_tokens"], ignore_eos=True)
    for prompt, tokens in zip(reference["prompts"], reference["tokens"]):
        assert model.generate(prompt, params).token_ids == tokens, prompt


@pytest.mark.parametrize("name", CASES)
def test_ort_engine_tokens_equal_transformers(name, unpacked, tmp_path):
    result = _compile(unpacked[name], tmp_path / "out.kvc")
    config, (layers, _, _) = _config(name), _dims(_config(name))
    graph = onnx.load(str(tmp_path / "out.kvc" / "graph.onnx"), load_external_data=False).graph
    counts = Counter(n.op_type for n in graph.node)
    assert counts["Attention"] == layers and counts["TensorScatter"] == 2 * layers
    assert result.manifest.cache.sliding_window == config.get("sliding_window")
    _assert_tokens_equal_reference(name, tmp_path / "out.kvc")


@pytest.mark.parametrize("name", NO_POSITION_IDS)
def test_positions_computed_in_the_graph_become_an_input_that_rope_reads(name, unpacked, tmp_path):
    _compile(unpacked[name], tmp_path / "out.kvc")
    graph = onnx.load(str(tmp_path / "out.kvc" / "graph.onnx"), load_external_data=False).graph
    assert "position_ids" in [i.name for i in graph.input]
    rotary = [n for n in graph.node if n.op_type == "RotaryEmbedding"]
    assert rotary and all(list(n.input)[3:] == ["position_ids"] for n in rotary)


@pytest.mark.parametrize("name", ["mistral_window8", "gemma"])  # gemma: the position_ids input kvc adds
def test_tvm_engine_tokens_equal_transformers(name, unpacked, tmp_path):
    pytest.importorskip("tvm")
    _compile(unpacked[name], tmp_path / "out.kvc", engine="tvm")
    _assert_tokens_equal_reference(name, tmp_path / "out.kvc")
