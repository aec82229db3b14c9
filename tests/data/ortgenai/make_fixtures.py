"""Build the onnxruntime-genai model-builder fixtures in this folder (run with the peers venv).

    /work/peers/venv/bin/python tests/data/ortgenai/make_fixtures.py

Cases: llama, qwen2, qwen3, mistral (8-token window), phi3 (fused qkv / gate_up), gemma, granite (its four
multipliers) fp32; llama fp16 (the builder's MultiHeadAttention form, as fp16 is not a CPU combination it
supports); llama int4 (MatMulNBits). Not built: SmolLM3 (the builder stops with KeyError 'position_ids') and
Phi-3 with partial rotary (the builder's graph fails in ONNX Runtime itself: cos_cache dimension). For each case: a tiny
transformers checkpoint (config from CASES, weights from ``seeded_weights``,
a numpy generator, so the suite's transformers regenerates the same model without torch's init),
a word-level tokenizer, then ``python -m onnxruntime_genai.models.builder -p <precision> -e cpu``.
Kept per case: model.onnx (weights inline), genai_config.json and the HF config.json beside it
(kvc compile reads the window from config.json). onnxruntime-genai 0.18, transformers 5.24.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SEED = 1234
VOCAB = 128
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
               rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
               pad_token_id=0)
# name -> (HF config, builder precision); int4 weights with fp32 activations (accuracy_level=1), so ONNX Runtime's
# MatMulNBits computes what its dequantized weights say
EXTRA_OPTIONS = {"int4": ["--extra_options", "accuracy_level=1"]}
CASES: dict[str, tuple[dict, str]] = {
    "llama_fp32": (dict(_COMMON, model_type="llama", architectures=["LlamaForCausalLM"], rope_theta=10000.0), "fp32"),
    "llama_fp16": (dict(_COMMON, model_type="llama", architectures=["LlamaForCausalLM"], rope_theta=10000.0), "fp16"),
    "qwen2_fp32": (dict(_COMMON, model_type="qwen2", architectures=["Qwen2ForCausalLM"], rope_theta=10000.0,
                        use_sliding_window=False), "fp32"),
    "qwen3_fp32": (dict(_COMMON, model_type="qwen3", architectures=["Qwen3ForCausalLM"], rope_theta=10000.0), "fp32"),
    "llama_int4": (dict(_COMMON, model_type="llama", architectures=["LlamaForCausalLM"], rope_theta=10000.0), "int4"),
    "mistral_window_fp32": (dict(_COMMON, model_type="mistral", architectures=["MistralForCausalLM"],
                                 rope_theta=10000.0, sliding_window=8), "fp32"),
    "phi3_fp32": (dict(_COMMON, model_type="phi3", architectures=["Phi3ForCausalLM"], rope_theta=10000.0,
                       original_max_position_embeddings=64), "fp32"),
    "gemma_fp32": (dict(_COMMON, model_type="gemma", architectures=["GemmaForCausalLM"], rope_theta=10000.0,
                        hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh"), "fp32"),
    "granite_fp32": (dict(_COMMON, model_type="granite", architectures=["GraniteForCausalLM"], rope_theta=10000.0,
                          embedding_multiplier=2.0, attention_multiplier=0.2, residual_multiplier=0.5,
                          logits_scaling=4.0), "fp32"),
}


def seeded_weights(model, seed: int = SEED) -> None:
    """Overwrite every parameter from a numpy generator: identical under any torch version.
    Scales are large enough that greedy tokens are decided by clear margins."""
    import torch

    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            shape = tuple(param.shape)
            if name.endswith("norm.weight") or "layernorm" in name:
                array = 1.0 + 0.1 * rng.standard_normal(shape)
            elif name.endswith("bias"):
                array = 0.1 * rng.standard_normal(shape)
            elif len(shape) == 2 and "embed" in name:
                array = rng.standard_normal(shape)
            else:
                array = rng.standard_normal(shape) / np.sqrt(shape[-1])
            param.copy_(torch.from_numpy(array.astype(np.float32)))


def hf_model(config_dict: dict, seed: int = SEED):
    """The fp32 transformers model of a case (also used by the tests as the reference)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, torch_dtype="float32")
    seeded_weights(model, seed)
    return model.eval()


def _tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(path)


def build(name: str, config_dict: dict, precision: str, work: Path) -> None:
    checkpoint = work / f"{name}_hf"
    model = hf_model(config_dict)
    model.save_pretrained(checkpoint)
    _tokenizer(checkpoint)
    out = work / f"{name}_onnx"
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(out),
                    "-p", precision, "-e", "cpu", "-c", str(work / "cache"), *EXTRA_OPTIONS.get(precision, [])],
                   check=True)
    target = HERE / name
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    import onnx

    onnx.save(onnx.load(str(out / "model.onnx")), str(target / "model.onnx"))  # weights inline: one file
    shutil.copy(out / "genai_config.json", target / "genai_config.json")
    (target / "config.json").write_text(json.dumps(config_dict, indent=1, sort_keys=True) + "\n")


def main(names: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name in names or list(CASES):
            config_dict, precision = CASES[name]
            build(name, config_dict, precision, Path(tmp))


if __name__ == "__main__":
    main(sys.argv[1:])
