"""Tiny seeded transformers models of the newer families, and what kvc must make of their config.json.

Shared by the torch parity tests and the export -> compile -> generate tests. Every case has GQA (4 query
heads, 2 kv heads) and switches on what sets its family apart, with values chosen so the feature matters at
random init (small softcaps, large multipliers, windows shorter than the test prompts where the ring buffer can
express them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from kvc.models.config import Activation, Family, ModelConfig, NormKind, NormPlacement, QkNorm

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, INTER = 128, 64, 2, 4, 2, 96


@dataclass(frozen=True)
class FamilyCase:
    name: str
    make_hf: Callable[[], Any]  # a transformers *ForCausalLM at random init
    expected: ModelConfig  # what config_from_hf_dict must make of its saved config.json


def _tf():
    import transformers

    return transformers


def _common(**kw) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                num_key_value_heads=KV_HEADS, intermediate_size=INTER, max_position_embeddings=256,
                attn_implementation="eager", bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw)


def _expected(family: Family, **kw) -> ModelConfig:
    base = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS, num_kv_heads=KV_HEADS,
                intermediate_size=INTER, max_position_embeddings=256, bos_token_id=1, eos_token_ids=(2,))
    return ModelConfig(family, **{**base, **kw})


def _qwen3():
    tf = _tf()
    return tf.Qwen3ForCausalLM(tf.Qwen3Config(**_common(head_dim=32, rms_norm_eps=1e-6, rope_theta=1e6,
                                                        tie_word_embeddings=True)))


def _phi3():
    tf = _tf()
    return tf.Phi3ForCausalLM(tf.Phi3Config(**_common(partial_rotary_factor=0.5, sliding_window=16,
                                                      rms_norm_eps=1e-5)))


def _gemma():
    tf = _tf()
    return tf.GemmaForCausalLM(tf.GemmaConfig(**_common(head_dim=16, rms_norm_eps=1e-6)))


def _gemma2(window: int):
    def make():
        tf = _tf()
        return tf.Gemma2ForCausalLM(tf.Gemma2Config(**_common(
            head_dim=16, rms_norm_eps=1e-6, query_pre_attn_scalar=4, sliding_window=window,
            attn_logit_softcapping=2.0, final_logit_softcapping=1.5)))
    return make


def _smollm3():
    tf = _tf()
    return tf.SmolLM3ForCausalLM(tf.SmolLM3Config(**_common(no_rope_layer_interval=2, rms_norm_eps=1e-5)))


def _olmo2():
    tf = _tf()
    return tf.Olmo2ForCausalLM(tf.Olmo2Config(**_common(rms_norm_eps=1e-5)))


def _granite():
    tf = _tf()
    return tf.GraniteForCausalLM(tf.GraniteConfig(**_common(
        rms_norm_eps=1e-5, embedding_multiplier=6.0, residual_multiplier=0.5, attention_multiplier=0.5,
        logits_scaling=2.0, attention_bias=True)))


def _stablelm():
    tf = _tf()
    return tf.StableLmForCausalLM(tf.StableLmConfig(**_common(use_qkv_bias=True, layer_norm_eps=1e-5)))


_GEMMA = dict(norm=NormKind.RMS_UNIT_OFFSET, activation=Activation.GELU_TANH, embedding_multiplier=HIDDEN ** 0.5,
              tie_word_embeddings=True, head_dim=None, norm_eps=1e-6)
_GEMMA2 = dict(_GEMMA, norm_placement=NormPlacement.SANDWICH, attention_scale=0.5, attn_logit_softcap=2.0,
               final_logit_softcap=1.5)

CASES = [
    FamilyCase("qwen3", _qwen3, _expected(Family.QWEN3, head_dim=32, qk_norm=QkNorm.PER_HEAD, rope_theta=1e6,
                                          norm_eps=1e-6, tie_word_embeddings=True)),
    FamilyCase("phi3-partial-rotary-window-16", _phi3, _expected(Family.PHI3, partial_rotary_factor=0.5,
                                                                 sliding_window=16)),
    FamilyCase("gemma", _gemma, _expected(Family.GEMMA, **_GEMMA)),
    # Windows bind in the parity prompts (9 + 3 tokens) but not at the e2e capacity (48 slots).
    FamilyCase("gemma2-window-5", _gemma2(5), _expected(Family.GEMMA2, **_GEMMA2, layer_windows=(5, None))),
    FamilyCase("gemma2-window-64", _gemma2(64), _expected(Family.GEMMA2, **_GEMMA2, layer_windows=(64, None))),
    FamilyCase("smollm3-nope", _smollm3, _expected(Family.SMOLLM3, nope_layers=(1,), rope_theta=2e6,
                                                   tie_word_embeddings=True)),
    FamilyCase("olmo2", _olmo2, _expected(Family.OLMO2, qk_norm=QkNorm.PROJECTION,
                                          norm_placement=NormPlacement.POST)),
    FamilyCase("granite", _granite, _expected(Family.GRANITE, attention_bias=True, o_proj_bias=True,
                                              embedding_multiplier=6.0, residual_multiplier=0.5, attention_scale=0.5,
                                              logits_divisor=2.0)),
    FamilyCase("stablelm", _stablelm, _expected(Family.STABLELM, norm=NormKind.LAYER, partial_rotary_factor=0.25,
                                                attention_bias=True)),
]


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded values for every parameter: HF initialises biases to 0 and norms to 1 (Gemma: 0), hiding them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_norm = "norm" in name and name.endswith("weight")
            p.copy_(1.0 + 0.1 * noise if is_norm else 0.05 * noise)
    return model.eval()


def build_hf(case: FamilyCase, seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_(case.make_hf(), seed)
