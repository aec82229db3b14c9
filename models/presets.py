"""Seeded random-init presets: tiny ones for tests, realistic sizes for benchmarks."""
from __future__ import annotations

from kvc.models.config import Activation, Family, ModelConfig, NormKind, NormPlacement, QkNorm


def _tiny(family: Family, **features) -> ModelConfig:
    """A 2-layer GQA model of ``family`` with its distinguishing features switched on."""
    return ModelConfig(family, vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=128, max_position_embeddings=1024, bos_token_id=1, eos_token_ids=(2,),
                       name=f"tiny-{family.value}", **features)


# One tiny preset per newer family: every feature of the family is on (windows wider than test capacities).
FAMILY_PRESETS: dict[str, ModelConfig] = {
    "tiny-qwen3": _tiny(Family.QWEN3, qk_norm=QkNorm.PER_HEAD, head_dim=32, rope_theta=1e6, norm_eps=1e-6,
                        tie_word_embeddings=True),
    "tiny-phi3": _tiny(Family.PHI3, partial_rotary_factor=0.5, sliding_window=512),
    "tiny-gemma": _tiny(Family.GEMMA, norm=NormKind.RMS_UNIT_OFFSET, activation=Activation.GELU_TANH,
                        embedding_multiplier=8.0, tie_word_embeddings=True, norm_eps=1e-6),
    "tiny-gemma2": _tiny(Family.GEMMA2, norm=NormKind.RMS_UNIT_OFFSET, norm_placement=NormPlacement.SANDWICH,
                         activation=Activation.GELU_TANH, embedding_multiplier=8.0, tie_word_embeddings=True,
                         attention_scale=32 ** -0.5, attn_logit_softcap=50.0, final_logit_softcap=30.0,
                         layer_windows=(512, None), norm_eps=1e-6),
    "tiny-smollm3": _tiny(Family.SMOLLM3, nope_layers=(1,), rope_theta=2e6, tie_word_embeddings=True),
    "tiny-olmo2": _tiny(Family.OLMO2, qk_norm=QkNorm.PROJECTION, norm_placement=NormPlacement.POST),
    "tiny-granite": _tiny(Family.GRANITE, embedding_multiplier=12.0, residual_multiplier=0.22,
                          attention_scale=0.0078125, logits_divisor=8.0),
    "tiny-stablelm": _tiny(Family.STABLELM, norm=NormKind.LAYER, partial_rotary_factor=0.25, attention_bias=True),
}

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
    **FAMILY_PRESETS,
    # Benchmarks: ~110M parameters (SmolLM-135M-like shape) and ~1.1B (TinyLlama-like).
    "llama-100m": ModelConfig(Family.LLAMA, vocab_size=32000, hidden_size=576, num_layers=24, num_heads=9,
                              num_kv_heads=3, intermediate_size=1536, max_position_embeddings=8192,
                              tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,), name="llama-100m"),
    "llama-1b": ModelConfig(Family.LLAMA, vocab_size=32000, hidden_size=2048, num_layers=22, num_heads=32,
                            num_kv_heads=4, intermediate_size=5632, max_position_embeddings=8192,
                            bos_token_id=1, eos_token_ids=(2,), name="llama-1b"),
}
