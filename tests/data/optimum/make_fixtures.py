"""Build the optimum-onnx fixtures in this folder (run with a side venv; optimum-onnx needs its own transformers).

    python -m venv /work/wt/optimum-venv
    /work/wt/optimum-venv/bin/pip install torch==2.13.0 optimum-onnx onnxruntime
    /work/wt/optimum-venv/bin/python tests/data/optimum/make_fixtures.py [CASE ...]

Cases: llama, qwen2, mistral with an 8-token window (shorter than two of the test prompts) and a 48-token window
(longer than every prompt, crossed while generating), gpt2, qwen3, phi3, gemma, granite, olmo2, stablelm, smollm3.
For each case: a tiny transformers checkpoint (config from CASES, weights from ``seeded_weights``, a numpy generator,
so any transformers version rebuilds the same model), then
``optimum-cli export onnx --task text-generation-with-past`` (one graph with past inputs, empty past for the prefill:
the form optimum-onnx 0.1 writes), and ``merged``: the same checkpoint exported as a decoder without past and one
with past, joined by ``optimum.onnx.merge_decoders`` into the ``use_cache_branch`` If-graph older optimum wrote.
Kept per case: model.onnx.gz (weights inline; the tests unpack it beside config.json), config.json, and
reference.json: transformers' greedy ``generate`` (32 new tokens, EOS ignored) for PROMPTS, computed here, as the
suite's transformers may differ.
Made with optimum-onnx 0.1.0, optimum 2.1.0, transformers 4.57.6, torch 2.13.0 (CPU).
"""
from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SEED = 4321
VOCAB = 96
NEW_TOKENS = 32
PROMPTS = [[1, 5, 17, 90], [1, 3, 42, 8, 80, 61, 7, 19, 33, 12, 90, 4, 77], [1] + list(range(20, 40))]
_LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                   rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                   pad_token_id=0, rope_theta=10000.0)
CASES: dict[str, dict] = {
    "llama": dict(_LLAMA_LIKE, model_type="llama", architectures=["LlamaForCausalLM"]),
    "qwen2": dict(_LLAMA_LIKE, model_type="qwen2", architectures=["Qwen2ForCausalLM"], use_sliding_window=False),
    "mistral_window8": dict(_LLAMA_LIKE, model_type="mistral", architectures=["MistralForCausalLM"],
                            sliding_window=8),
    "mistral_window48": dict(_LLAMA_LIKE, model_type="mistral", architectures=["MistralForCausalLM"],
                             sliding_window=48),
    "gpt2": dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=VOCAB, n_embd=32, n_layer=2,
                 n_head=2, n_positions=64, n_inner=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                 tie_word_embeddings=True),
    "qwen3": dict(_LLAMA_LIKE, model_type="qwen3", architectures=["Qwen3ForCausalLM"]),
    "phi3": dict(_LLAMA_LIKE, model_type="phi3", architectures=["Phi3ForCausalLM"],
                 original_max_position_embeddings=64),
    "gemma": dict(_LLAMA_LIKE, model_type="gemma", architectures=["GemmaForCausalLM"]),
    "granite": dict(_LLAMA_LIKE, model_type="granite", architectures=["GraniteForCausalLM"], embedding_multiplier=2.0,
                    attention_multiplier=0.2, residual_multiplier=0.5, logits_scaling=4.0),
    "olmo2": dict(_LLAMA_LIKE, model_type="olmo2", architectures=["Olmo2ForCausalLM"]),
    "stablelm": dict(_LLAMA_LIKE, model_type="stablelm", architectures=["StableLmForCausalLM"], layer_norm_eps=1e-5),
    "smollm3": dict(_LLAMA_LIKE, model_type="smollm3", architectures=["SmolLM3ForCausalLM"], no_rope_layer_interval=2),
}
MERGED_CASES = ["llama"]


def seeded_weights(model, seed: int = SEED) -> None:
    """Overwrite every parameter from a numpy generator: identical under any torch/transformers version.
    Scales are large enough that greedy tokens are decided by clear margins."""
    import torch

    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            shape = tuple(param.shape)
            if name.endswith("norm.weight") or "layernorm" in name or name.endswith(("ln_1.weight", "ln_2.weight",
                                                                                      "ln_f.weight")):
                array = 1.0 + 0.1 * rng.standard_normal(shape)
            elif name.endswith("bias"):
                array = 0.1 * rng.standard_normal(shape)
            elif len(shape) == 2 and ("embed" in name or name.endswith(("wte.weight", "wpe.weight"))):
                array = rng.standard_normal(shape)
            else:
                array = rng.standard_normal(shape) / np.sqrt(shape[0] if name.endswith(("c_attn.weight",
                    "c_proj.weight", "c_fc.weight")) else shape[-1])
            param.copy_(torch.from_numpy(array.astype(np.float32)))


def hf_model(config_dict: dict, seed: int = SEED):
    """The fp32 transformers model of a case (eager attention, so the window is applied by any version)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**config_dict)
    # a torch dtype, not "float32": transformers 4.46 (tests/data/torch_exports) takes only that
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32, attn_implementation="eager")
    seeded_weights(model, seed)
    return model.eval()


def hf_greedy(model, prompt: list[int]) -> list[int]:
    import torch

    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _export_plain(checkpoint: Path, out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "optimum.commands.optimum_cli", "export", "onnx", "-m", str(checkpoint),
                    "--task", "text-generation-with-past", str(out)], check=True)
    return out / "model.onnx"


def _export_merged(checkpoint: Path, out: Path) -> Path:
    """optimum's legacy pair (a decoder without past inputs, one with) merged on ``use_cache_branch``.
    optimum-onnx 0.1 exports only the second; the first comes from its own config with use_past_in_inputs=False."""
    from optimum.exporters.onnx import main_export
    from optimum.exporters.tasks import TasksManager
    from optimum.onnx import merge_decoders
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint)
    constructor = TasksManager.get_exporter_config_constructor(
        exporter="onnx", model_type=config.model_type, task="text-generation-with-past", library_name="transformers")
    without_past = constructor(config, task="text-generation", use_past=True, use_past_in_inputs=False)
    main_export(str(checkpoint), out / "without_past", task="text-generation-with-past", no_post_process=True,
                custom_onnx_configs={"model": without_past})
    with_past = _export_plain(checkpoint, out / "with_past")
    merge_decoders(out / "without_past" / "model.onnx", with_past, save_path=out / "merged.onnx")
    return out / "merged.onnx"


def build(name: str, config_dict: dict, work: Path, merged: bool) -> None:
    import onnx

    checkpoint = work / f"{name}_hf"
    model = hf_model(config_dict)
    model.config.attn_implementation = None
    model.save_pretrained(checkpoint)
    exported = (_export_merged if merged else _export_plain)(checkpoint, work / f"{name}_{merged}_onnx")
    target = HERE / (f"{name}_merged" if merged else name)
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    # weights inline, one file, gzipped (half the size: the graph's names compress, the random weights do not)
    with open(target / "model.onnx.gz", "wb") as file, \
            gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=file, mtime=0) as out:
        out.write(onnx.load(str(exported)).SerializeToString())
    (target / "config.json").write_text(json.dumps(config_dict, indent=1, sort_keys=True) + "\n")
    reference = {"new_tokens": NEW_TOKENS, "prompts": PROMPTS, "tokens": [hf_greedy(model, p) for p in PROMPTS]}
    (target / "reference.json").write_text(json.dumps(reference) + "\n")


def main(names: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name in names or list(CASES) + [f"{n}_merged" for n in MERGED_CASES]:
            base = name.removesuffix("_merged")
            build(base, CASES[base], Path(tmp), merged=name.endswith("_merged"))


if __name__ == "__main__":
    main(sys.argv[1:])
