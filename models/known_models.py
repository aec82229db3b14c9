"""Shapes of well-known checkpoints, copied from their published Hugging Face config.json files.

Used by ``kvc plan`` to size KV caches and weights without downloading anything. Each entry is the
base (not instruct) checkpoint named in ``ModelConfig.name``; ``DEFAULT_DTYPES`` holds its published
``torch_dtype`` (GPT-2 ships float32 weights and names none).
"""
from __future__ import annotations

from kvc.models.config import Family, ModelConfig, RopeScaling, RopeScalingKind


def _llama3_rope(factor: float) -> RopeScaling:
    return RopeScaling(RopeScalingKind.LLAMA3, factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=8192)


def _llama2(name: str, hidden: int, layers: int, heads: int, kv_heads: int, inter: int) -> ModelConfig:
    return ModelConfig(Family.LLAMA, vocab_size=32000, hidden_size=hidden, num_layers=layers, num_heads=heads,
                       num_kv_heads=kv_heads, intermediate_size=inter, max_position_embeddings=4096,
                       norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_ids=(2,), name=name)


def _llama3(name: str, hidden: int, layers: int, heads: int, inter: int, max_pos: int = 131072,
            rope: RopeScaling | None = None, tie: bool = False, head_dim: int | None = None) -> ModelConfig:
    return ModelConfig(Family.LLAMA, vocab_size=128256, hidden_size=hidden, num_layers=layers, num_heads=heads,
                       num_kv_heads=8, intermediate_size=inter, max_position_embeddings=max_pos, head_dim=head_dim,
                       norm_eps=1e-5, rope_theta=500000.0, rope_scaling=rope, tie_word_embeddings=tie,
                       bos_token_id=128000, eos_token_ids=(128001,), name=name)


def _qwen25(name: str, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, inter: int,
            max_pos: int, tie: bool, eps: float) -> ModelConfig:
    # Qwen2.5 configs carry "sliding_window" but with "use_sliding_window": false, so no window here.
    return ModelConfig(Family.LLAMA, vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
                       num_kv_heads=kv_heads, intermediate_size=inter, max_position_embeddings=max_pos,
                       norm_eps=eps, rope_theta=1000000.0, attention_bias=True, tie_word_embeddings=tie,
                       bos_token_id=151643, eos_token_ids=(151643,), name=name)


def _gpt2(name: str, hidden: int, layers: int, heads: int) -> ModelConfig:
    return ModelConfig(Family.GPT2, vocab_size=50257, hidden_size=hidden, num_layers=layers, num_heads=heads,
                       num_kv_heads=heads, intermediate_size=4 * hidden, max_position_embeddings=1024,
                       norm_eps=1e-5, attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
                       bos_token_id=50256, eos_token_ids=(50256,), name=name)


KNOWN_MODELS: dict[str, ModelConfig] = {
    "llama-2-7b": _llama2("meta-llama/Llama-2-7b-hf", 4096, 32, 32, 32, 11008),
    "llama-2-13b": _llama2("meta-llama/Llama-2-13b-hf", 5120, 40, 40, 40, 13824),
    "llama-2-70b": _llama2("meta-llama/Llama-2-70b-hf", 8192, 80, 64, 8, 28672),
    "llama-3-8b": _llama3("meta-llama/Meta-Llama-3-8B", 4096, 32, 32, 14336, max_pos=8192),
    "llama-3.1-8b": _llama3("meta-llama/Llama-3.1-8B", 4096, 32, 32, 14336, rope=_llama3_rope(8.0)),
    "llama-3.1-70b": _llama3("meta-llama/Llama-3.1-70B", 8192, 80, 64, 28672, rope=_llama3_rope(8.0)),
    "llama-3.1-405b": _llama3("meta-llama/Llama-3.1-405B", 16384, 126, 128, 53248, rope=_llama3_rope(8.0)),
    "llama-3.2-1b": _llama3("meta-llama/Llama-3.2-1B", 2048, 16, 32, 8192, rope=_llama3_rope(32.0), tie=True,
                            head_dim=64),
    "llama-3.2-3b": _llama3("meta-llama/Llama-3.2-3B", 3072, 28, 24, 8192, rope=_llama3_rope(32.0), tie=True,
                            head_dim=128),
    "mistral-7b-v0.1": ModelConfig(Family.LLAMA, vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
                                   num_kv_heads=8, intermediate_size=14336, max_position_embeddings=32768,
                                   norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096, bos_token_id=1,
                                   eos_token_ids=(2,), name="mistralai/Mistral-7B-v0.1"),
    "mistral-7b-v0.3": ModelConfig(Family.LLAMA, vocab_size=32768, hidden_size=4096, num_layers=32, num_heads=32,
                                   num_kv_heads=8, intermediate_size=14336, max_position_embeddings=32768,
                                   norm_eps=1e-5, rope_theta=1000000.0, bos_token_id=1, eos_token_ids=(2,),
                                   name="mistralai/Mistral-7B-v0.3"),
    "qwen2.5-0.5b": _qwen25("Qwen/Qwen2.5-0.5B", 151936, 896, 24, 14, 2, 4864, 32768, tie=True, eps=1e-6),
    "qwen2.5-7b": _qwen25("Qwen/Qwen2.5-7B", 152064, 3584, 28, 28, 4, 18944, 131072, tie=False, eps=1e-6),
    "qwen2.5-72b": _qwen25("Qwen/Qwen2.5-72B", 152064, 8192, 80, 64, 8, 29568, 131072, tie=False, eps=1e-5),
    "smollm-135m": ModelConfig(Family.LLAMA, vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9,
                               num_kv_heads=3, intermediate_size=1536, max_position_embeddings=2048,
                               norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=0,
                               eos_token_ids=(0,), name="HuggingFaceTB/SmolLM-135M"),
    "smollm2-1.7b": ModelConfig(Family.LLAMA, vocab_size=49152, hidden_size=2048, num_layers=24, num_heads=32,
                                num_kv_heads=32, intermediate_size=8192, max_position_embeddings=8192,
                                norm_eps=1e-5, rope_theta=130000.0, tie_word_embeddings=True, bos_token_id=1,
                                eos_token_ids=(2,), name="HuggingFaceTB/SmolLM2-1.7B"),
    "tinyllama-1.1b": ModelConfig(Family.LLAMA, vocab_size=32000, hidden_size=2048, num_layers=22, num_heads=32,
                                  num_kv_heads=4, intermediate_size=5632, max_position_embeddings=2048,
                                  norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_ids=(2,),
                                  name="TinyLlama/TinyLlama-1.1B-Chat-v1.0"),
    "gpt2": _gpt2("openai-community/gpt2", 768, 12, 12),
    "gpt2-medium": _gpt2("openai-community/gpt2-medium", 1024, 24, 16),
    "gpt2-large": _gpt2("openai-community/gpt2-large", 1280, 36, 20),
    "gpt2-xl": _gpt2("openai-community/gpt2-xl", 1600, 48, 25),
}

# Published weight dtype of each entry (config.json "torch_dtype"), as kvc dtype names.
DEFAULT_DTYPES: dict[str, str] = {
    "llama-2-7b": "fp16", "llama-2-13b": "fp16", "llama-2-70b": "fp16",
    "llama-3-8b": "bf16", "llama-3.1-8b": "bf16", "llama-3.1-70b": "bf16", "llama-3.1-405b": "bf16",
    "llama-3.2-1b": "bf16", "llama-3.2-3b": "bf16",
    "mistral-7b-v0.1": "bf16", "mistral-7b-v0.3": "bf16",
    "qwen2.5-0.5b": "bf16", "qwen2.5-7b": "bf16", "qwen2.5-72b": "bf16",
    "smollm-135m": "bf16", "smollm2-1.7b": "bf16", "tinyllama-1.1b": "bf16",
    "gpt2": "fp32", "gpt2-medium": "fp32", "gpt2-large": "fp32", "gpt2-xl": "fp32",
}
