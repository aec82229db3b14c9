"""Build the older-transformers torch.onnx.export fixtures in this folder, each with the transformers its name says
(side venvs; the suite's own exports in tests/passes/_hf_exports.py use the suite's transformers):

    /work/wt/optimum-venv/bin/python tests/data/torch_exports/make_fixtures.py   # transformers 4.57.6 cases
    /work/wt/tf44-venv/bin/python tests/data/torch_exports/make_fixtures.py      # transformers 4.46.3 cases

(optimum-venv: see tests/data/optimum/make_fixtures.py; tf44-venv: ``python -m venv``, then
``pip install torch==2.13.0 transformers==4.46.3 onnx==1.23.2 onnxscript numpy``.) A run builds the cases of the
transformers it runs with, or the CASE names given.

Cases: llama, mistral with an 8-token window (shorter than two of the test prompts) and gpt2 (4.46: also qwen2, phi3,
gemma, granite, stablelm, and gemma2 with an 8-token window on alternate layers, which kvc refuses), exported with
``torch.onnx.export`` exactly as tests/passes/_hf_exports.py exports the suite's own (past KV as explicit inputs and
outputs, opset 18, no config.json beside the graph). transformers 4.57.6: the dynamo exporter only (the TorchScript
exporter cannot trace its masks, built with torch.vmap: ``RuntimeError: unordered_map::at`` in the tracer).
transformers 4.46.3: both exporters (its caches are passed in the legacy tuple form that version reads).
Models and prompts are the optimum fixtures' (same configs, same numpy-seeded weights, so the graphs are small).
Kept per case: model.onnx.gz (weights inline) and reference.json: transformers' greedy ``generate`` (32 new tokens,
EOS ignored) for the prompts, computed here with that transformers.
Made with torch 2.13.0 (CPU), onnxscript 0.7.2.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parents[1]
# name -> (optimum fixture config, exporter, transformers version it is made with)
CASES = {"llama_dynamo": ("llama", "dynamo", "4.57"), "mistral_window8_dynamo": ("mistral_window8", "dynamo", "4.57"),
         "gpt2_dynamo": ("gpt2", "dynamo", "4.57"),
         **{f"tf446_{arch}_{exporter}": (arch, exporter, "4.46") for exporter in ("torchscript", "dynamo")
            for arch in ("llama", "mistral_window8", "gpt2", "qwen2", "phi3", "gemma", "granite", "stablelm")},
         "tf446_gemma2_window8_torchscript": ("gemma2_window8", "torchscript", "4.46")}
# Cases with no optimum fixture: configs in the optimum fixtures' style. 4.46's Gemma2 fed a DynamicCache windows
# its masks from the first new token, so its decode ignores the window: kvc must refuse the graph.
EXTRA_CONFIGS = {"gemma2_window8": ("gemma", dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"],
                                                   sliding_window=8))}  # arch -> (optimum case, what it changes)


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class _LegacyFlatCache:
    """exports._FlatCache for transformers 4.4x: caches in and out as a DynamicCache's legacy tuples."""

    def __new__(cls, model, num_layers: int):
        import torch
        from transformers import DynamicCache

        class Flat(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask, position_ids, *flat_past):
                pairs = tuple((flat_past[2 * i], flat_past[2 * i + 1]) for i in range(num_layers))
                out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 past_key_values=DynamicCache.from_legacy_cache(pairs), use_cache=True)
                cache = out.past_key_values
                legacy = cache.to_legacy_cache() if hasattr(cache, "to_legacy_cache") else cache
                return (out.logits, *[t for pair in legacy for t in pair])
        return Flat()


def build(name: str, work: Path) -> None:
    import onnx
    import transformers

    optimum = _module("optimum_fixtures", TESTS / "data" / "optimum" / "make_fixtures.py")
    exports = _module("hf_exports", TESTS / "passes" / "_hf_exports.py")
    arch, exporter, version = CASES[name]
    if not transformers.__version__.startswith(version + "."):
        raise SystemExit(f"{name} is made with transformers {version}, this is {transformers.__version__}")
    base, changes = EXTRA_CONFIGS.get(arch, (arch, {}))
    config = dict(optimum.CASES[base], **changes)
    model = optimum.hf_model(config)
    kv_heads = config.get("num_key_value_heads", config.get("n_head"))
    head_dim = config.get("head_dim", config.get("n_embd", 0) // config.get("n_head", 1))
    path = work / f"{name}.onnx"
    flat = (exports._FlatCache if version == "4.57" else _LegacyFlatCache)(model, 2).eval()
    exports._export(flat, exports._sample_inputs(kv_heads, head_dim), path, exporter)
    target = HERE / name
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    with open(target / "model.onnx.gz", "wb") as file, \
            gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=file, mtime=0) as out:
        out.write(onnx.load(str(path)).SerializeToString())
    reference = {"transformers": transformers.__version__, "exporter": exporter, "arch": arch,
                 "sliding_window": config.get("sliding_window"), "new_tokens": optimum.NEW_TOKENS,
                 "prompts": optimum.PROMPTS, "tokens": [optimum.hf_greedy(model, p) for p in optimum.PROMPTS]}
    (target / "reference.json").write_text(json.dumps(reference) + "\n")


def main(names: list[str]) -> None:
    import transformers

    mine = [n for n, (_, _, version) in CASES.items() if transformers.__version__.startswith(version + ".")]
    with tempfile.TemporaryDirectory() as tmp:
        for name in names or mine:
            build(name, Path(tmp))


if __name__ == "__main__":
    main(sys.argv[1:])
