"""onnxruntime-genai model-builder graphs (tests/data/ortgenai, made by make_fixtures.py with
onnxruntime-genai 0.18) -> kvc compile -> 32 greedy tokens equal transformers' generate on 3 prompts,
one longer than Mistral's 8-token window; fused-op counts; refusals in one line."""
from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

DATA = Path(__file__).resolve().parents[1] / "data" / "ortgenai"
CASES = ["llama_fp32", "qwen2_fp32", "mistral_window_fp32", "llama_fp16"]
PROMPTS = [[1, 5, 17, 99], [1, 3, 42, 8, 100, 61, 7, 19, 33, 12, 90, 4, 77], [1] + list(range(20, 40))]
CAPACITY, NEW_TOKENS = 64, 32


def _fixture_module():
    spec = importlib.util.spec_from_file_location("ortgenai_make_fixtures", DATA / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fixtures():
    return _fixture_module()


def _compile(name: str, out: Path, engine: str = "ort"):
    kv_dtype = "fp32"
    from kvc.compiler.options import CompileOptions, Device, EngineKind
    from kvc.compiler.pipeline import compile_model

    return compile_model(DATA / name / "model.onnx", out,
                         CompileOptions(engine=EngineKind(engine), device=Device("cpu"), max_seq_len=CAPACITY, kv_dtype=kv_dtype),
                         progress=lambda *_: None)


def _hf_greedy(hf, prompt: list[int]) -> list[int]:
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _kvc_greedy(artifact: Path, prompt: list[int]) -> list[int]:
    from kvc.runtime import load
    from kvc.runtime.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    return load(artifact).generate(prompt, params).token_ids


def _op_counts(artifact: Path) -> Counter:
    graph = onnx.load(str(artifact / "graph.onnx"), load_external_data=False).graph
    return Counter((n.domain, n.op_type) for n in graph.node)


@pytest.mark.parametrize("name", CASES)
def test_ort_engine_tokens_equal_transformers(name, fixtures, tmp_path):
    config = json.loads((DATA / name / "config.json").read_text())
    hf = fixtures.hf_model(config)
    result = _compile(name, tmp_path / "out.kvc")
    layers = config["num_hidden_layers"]
    counts = _op_counts(tmp_path / "out.kvc")
    assert not [op for (domain, op) in counts if domain == "com.microsoft" or op == "SimplifiedLayerNormalization"]
    assert counts[("", "Attention")] == layers
    assert counts[("", "RotaryEmbedding")] == 2 * layers
    assert counts[("", "RMSNormalization")] == 2 * layers + 1
    assert counts[("", "TensorScatter")] == 2 * layers
    assert result.manifest.cache.sliding_window == config.get("sliding_window")
    print(name, {op: n for (_, op), n in counts.items() if op in ("Attention", "RotaryEmbedding", "RMSNormalization",
                                                                   "TensorScatter")})
    for prompt in PROMPTS:
        assert _kvc_greedy(tmp_path / "out.kvc", prompt) == _hf_greedy(hf, prompt), prompt
