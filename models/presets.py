"""Seeded random-init presets: tiny ones for tests, realistic sizes for benchmarks."""
from __future__ import annotations

from kvc.models.config import Family, ModelConfig

RANDOM_PRESETS: dict[str, ModelConfig] = {
    # Tests: a few layers, GQA, small vocab; one per family variant.
    "tiny": ModelConfig(Family.LLAMA, vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, intermediate_size=128, max_position_embeddings=1024,
                        bos_token_id=1, eos_token_ids=(2,), name="tiny"),
    "tiny-qwen2": ModelConfig(Family.LLAMA, vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                              num_kv_heads=1, intermediate_size=128, max_position_embeddings=1024,
                              attention_bias=True, tie_word_embeddings=True, rope_theta=1e6,
                              norm_eps=1e-6, eos_token_ids=(2,), name="tiny-qwen2"),
    "tiny-mistral": ModelConfig(Family.LLAMA, vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                                num_kv_heads=2, intermediate_size=128, max_position_embeddings=1024,
                                sliding_window=8, bos_token_id=1, eos_token_ids=(2,), name="tiny-mistral"),
    "tiny-gpt2": ModelConfig(Family.GPT2, vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                             num_kv_heads=4, intermediate_size=256, max_position_embeddings=1024,
                             tie_word_embeddings=True, bos_token_id=0, eos_token_ids=(0,), name="tiny-gpt2"),
    # Benchmarks: ~110M parameters (SmolLM-135M-like shape) and ~1.1B (TinyLlama-like).
    "llama-100m": ModelConfig(Family.LLAMA, vocab_size=32000, hidden_size=576, num_layers=24, num_heads=9,
                              num_kv_heads=3, intermediate_size=1536, max_position_embeddings=8192,
                              tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,), name="llama-100m"),
    "llama-1b": ModelConfig(Family.LLAMA, vocab_size=32000, hidden_size=2048, num_layers=22, num_heads=32,
                            num_kv_heads=4, intermediate_size=5632, max_position_embeddings=8192,
                            bos_token_id=1, eos_token_ids=(2,), name="llama-1b"),
}
