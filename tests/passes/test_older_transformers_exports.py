"""torch.onnx.export graphs of older transformers (tests/data/torch_exports, made by make_fixtures.py): transformers
4.57.6 through the dynamo exporter (the TorchScript one cannot trace it): llama, mistral with an 8-token window and
gpt2; 4.46.3 through both exporters: those and qwen2, phi3, gemma, granite, stablelm. The suite's own exports in
test_torch_exports_compile.py use the suite's transformers. kvc compile with no config.json beside the graph -> 32
greedy tokens equal that transformers' generate (reference.json) on 3 prompts, two past the window; ORT engine on
all, TVM on a subset. What each needs:
* 4.57 GPT-2 masks its scores with Where(causal bias, scores, lowest) and the dynamo exporter sizes its second
  layer's rows from the past length (kvc.passes.length_uses);
* 4.57 mistral crops its caches to the window (kvc.passes.cache_crop); 4.46 mistral applies it in the mask only
  (kvc.passes.mask_windows reads it by evaluating the masks);
* 4.46 GPT-2 divides its scores by torch.full([], d ** 0.5), folded by canonicalize."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "data" / "torch_exports"
ROTARY_LAYERS = {"llama_dynamo": 4, "mistral_window8_dynamo": 4, "gpt2_dynamo": 0,  # q and k of 2 layers
                 **{f"tf446_{arch}_{exporter}": 0 if arch == "gpt2" else 4 for exporter in ("torchscript", "dynamo")
                    for arch in ("llama", "mistral_window8", "gpt2", "qwen2", "phi3", "gemma", "granite", "stablelm")}}
CAPACITY = 64


def _unpack(name: str, folder: Path) -> Path:
    path = folder / "model.onnx"
    path.write_bytes(gzip.decompress((DATA / name / "model.onnx.gz").read_bytes()))
    return path


def _compile_and_generate(name: str, tmp_path: Path, engine: str) -> None:
    from kvc.compiler.options import CompileOptions, Device, EngineKind
    from kvc.compiler.pipeline import compile_model
    from kvc.runtime import load
    from kvc.runtime.sampling import SamplingParams

    reference = json.loads((DATA / name / "reference.json").read_text())
    source = tmp_path / "source"
    source.mkdir()
    result = compile_model(_unpack(name, source), tmp_path / "out.kvc",
                           CompileOptions(engine=EngineKind(engine), device=Device("cpu"), max_seq_len=CAPACITY),
                           progress=lambda *_: None)
    assert result.manifest.cache.sliding_window == reference["sliding_window"]
    model = load(tmp_path / "out.kvc")
    params = SamplingParams(temperature=0.0, max_new_tokens=reference["new_tokens"], ignore_eos=True)
    for prompt, tokens in zip(reference["prompts"], reference["tokens"]):
        assert model.generate(prompt, params).token_ids == tokens, (name, prompt)


@pytest.mark.parametrize("name", ROTARY_LAYERS)
def test_ort_engine_tokens_equal_that_transformers(name, tmp_path):
    import onnx

    _compile_and_generate(name, tmp_path, "ort")
    graph = onnx.load(str(tmp_path / "out.kvc" / "graph.onnx"), load_external_data=False).graph
    assert sum(n.op_type == "Attention" for n in graph.node) == 2
    rotary = [n for n in graph.node if n.op_type == "RotaryEmbedding"]
    # cos/sin read from tables by position_ids (4.57 builds them from inv_freq.expand(batch, ...) x positions)
    assert len(rotary) == ROTARY_LAYERS[name]
    assert all(len(n.input) == 4 and n.input[3] == "position_ids" for n in rotary)


@pytest.mark.parametrize("name", ["llama_dynamo", "gpt2_dynamo", "tf446_mistral_window8_torchscript"])
def test_tvm_engine_tokens_equal_that_transformers(name, tmp_path):
    pytest.importorskip("tvm")
    _compile_and_generate(name, tmp_path, "tvm")


def test_a_config_saying_another_window_than_the_masks_is_refused(tmp_path):
    """4.46 mistral's masks hide keys 8 or more positions back; a config.json beside it saying 16 is the wrong one."""
    from kvc.errors import GraphError

    source = tmp_path / "source"
    source.mkdir()
    graph = _unpack("tf446_mistral_window8_torchscript", source)
    (source / "config.json").write_text(json.dumps(_mistral_config(sliding_window=16)))
    from kvc.compiler.options import CompileOptions, Device, EngineKind
    from kvc.compiler.pipeline import compile_model

    with pytest.raises(GraphError, match=r"says sliding window\(s\) 16 but the graph masks keys outside windows of 8 "):
        compile_model(graph, tmp_path / "out.kvc", CompileOptions(engine=EngineKind("ort"), device=Device("cpu"),
                                                                  max_seq_len=CAPACITY), progress=lambda *_: None)
    assert not (tmp_path / "out.kvc").exists()


def test_masks_with_no_single_window_are_refused_in_one_line(tmp_path):
    """4.46 Gemma2 exported with a DynamicCache windows prefills but not decode steps (mask_windows): kvc compile
    exits non-zero with one line naming the Softmax, and writes nothing."""
    from click.testing import CliRunner

    from kvc.cli.main import cli

    source = tmp_path / "source"
    source.mkdir()
    graph = _unpack("tf446_gemma2_window8_torchscript", source)
    result = CliRunner().invoke(cli, ["compile", str(graph), "-o", str(tmp_path / "out.kvc"), "--max-seq-len", "64"])
    assert result.exit_code != 0 and not (tmp_path / "out.kvc").exists()
    lines = result.output.strip().splitlines()
    assert "applies no single sliding window" in lines[-1] and "Traceback" not in result.output, result.output


def _mistral_config(sliding_window: int) -> dict:
    optimum = DATA.parent / "optimum" / "mistral_window8" / "config.json"
    return dict(json.loads(optimum.read_text()), sliding_window=sliding_window)
