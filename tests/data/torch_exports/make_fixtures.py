"""Build the older-transformers torch.onnx.export fixtures in this folder (run with the optimum side venv, whose
transformers is older than the suite's; see tests/data/optimum/make_fixtures.py for how it was made).

    /work/wt/optimum-venv/bin/python tests/data/torch_exports/make_fixtures.py [CASE ...]

Cases: llama, mistral with an 8-token window (shorter than two of the test prompts) and gpt2, exported with
``torch.onnx.export(dynamo=True)`` exactly as tests/passes/_hf_exports.py exports the suite's own (past KV as explicit
inputs and outputs, opset 18, no config.json beside the graph). The TorchScript exporter cannot trace this
transformers (its masks are built with torch.vmap: ``RuntimeError: unordered_map::at`` in the tracer), so it has no
cases. Models and prompts are the optimum fixtures' (same configs, same numpy-seeded weights, so the graphs are small).
Kept per case: model.onnx.gz (weights inline) and reference.json: transformers' greedy ``generate`` (32 new tokens,
EOS ignored) for the prompts, computed here with this transformers.
Made with transformers 4.57.6, torch 2.13.0 (CPU), onnxscript 0.7.2.
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
CASES = {"llama_dynamo": ("llama", "dynamo"), "mistral_window8_dynamo": ("mistral_window8", "dynamo"),
         "gpt2_dynamo": ("gpt2", "dynamo")}


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def build(name: str, work: Path) -> None:
    import onnx
    import transformers

    optimum = _module("optimum_fixtures", TESTS / "data" / "optimum" / "make_fixtures.py")
    exports = _module("hf_exports", TESTS / "passes" / "_hf_exports.py")
    arch, exporter = CASES[name]
    config = optimum.CASES[arch]
    model = optimum.hf_model(config)
    kv_heads = config.get("num_key_value_heads", config.get("n_head"))
    head_dim = config.get("head_dim", config.get("n_embd", 0) // config.get("n_head", 1))
    path = work / f"{name}.onnx"
    exports._export(exports._FlatCache(model, 2).eval(), exports._sample_inputs(kv_heads, head_dim), path, exporter)
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
    with tempfile.TemporaryDirectory() as tmp:
        for name in names or list(CASES):
            build(name, Path(tmp))


if __name__ == "__main__":
    main(sys.argv[1:])
