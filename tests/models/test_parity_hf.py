"""Own torch models vs Hugging Face transformers (the reference), weights moved through kvc's loader.

Each case builds a tiny seeded HF model with every parameter randomised (so biases and norm scales matter),
saves it as safetensors, loads it with load_hf_checkpoint, and compares fp32 logits (max abs diff <= 1e-4)
for a left-padded prefill and three decode steps: once with each side's own cache, and once with the own
model reading HF's cache (keys after RoPE, in HF's [batch, kv_heads, seq, head_dim] layout).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch

from kvc.models.config import Family, ModelConfig, RopeScaling, RopeScalingKind
from kvc.models.loaders.hf import config_from_hf_dict
from tests.models.hf_parity import check_decode_steps, check_prefill, saved_pair

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, LAYERS, HEADS, INTER = 128, 64, 2, 4, 96


@dataclass(frozen=True)
class Case:
    name: str
    make_hf: Callable[[], Any]
    expected: ModelConfig  # what config_from_hf_dict must make of the saved config.json


def _llama_common(**kw) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                intermediate_size=INTER, max_position_embeddings=256, rms_norm_eps=1e-5,
                attn_implementation="eager", **kw)


def _llama3_rope() -> Any:
    # original_max_position_embeddings 16 puts the 8 rotary frequencies in all three llama3 regimes.
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **_llama_common(num_key_value_heads=2, mlp_bias=True, rope_theta=500000.0, rope_scaling=scaling,
                        tie_word_embeddings=False, bos_token_id=1, eos_token_id=[2, 3])))


def _llama_mqa_linear() -> Any:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **_llama_common(num_key_value_heads=1, rope_scaling={"type": "linear", "factor": 2.0},
                        attention_bias=True, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)))


def _qwen2() -> Any:
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **_llama_common(num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True, bos_token_id=5,
                        eos_token_id=6)))


def _mistral_window() -> Any:
    return transformers.MistralForCausalLM(transformers.MistralConfig(
        **_llama_common(num_key_value_heads=2, sliding_window=4, tie_word_embeddings=False, bos_token_id=1,
                        eos_token_id=2)))


def _gpt2() -> Any:
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64, bos_token_id=0,
        eos_token_id=0, attn_implementation="eager"))


_LLAMA = dict(family=Family.LLAMA, vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS,
              intermediate_size=INTER, max_position_embeddings=256, norm_eps=1e-5)
CASES = [
    Case("llama-gqa-llama3-rope-mlp-bias", _llama3_rope, ModelConfig(
        **_LLAMA, num_kv_heads=2, rope_theta=500000.0, mlp_bias=True, bos_token_id=1, eos_token_ids=(2, 3),
        rope_scaling=RopeScaling(RopeScalingKind.LLAMA3, factor=8.0, original_max_position_embeddings=16))),
    Case("llama-mqa-linear-rope-tied-qkvo-bias", _llama_mqa_linear, ModelConfig(
        **_LLAMA, num_kv_heads=1, tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,),
        attention_bias=True, o_proj_bias=True, rope_scaling=RopeScaling(RopeScalingKind.LINEAR, factor=2.0))),
    Case("qwen2-gqa-bias-tied", _qwen2, ModelConfig(
        **_LLAMA, num_kv_heads=2, rope_theta=1e6, attention_bias=True, tie_word_embeddings=True, bos_token_id=5,
        eos_token_ids=(6,))),
    Case("mistral-gqa-window-4", _mistral_window, ModelConfig(
        **_LLAMA, num_kv_heads=2, sliding_window=4, bos_token_id=1, eos_token_ids=(2,))),
    Case("gpt2", _gpt2, ModelConfig(
        Family.GPT2, vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS, num_kv_heads=HEADS,
        intermediate_size=4 * HIDDEN, max_position_embeddings=64, norm_eps=1e-5, attention_bias=True,
        mlp_bias=True, tie_word_embeddings=True, bos_token_id=0, eos_token_ids=(0,))),
]


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded values for every parameter: HF initialises biases to 0 and norms to 1, which would hide them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_norm = "norm" in name or ".ln_" in name or name.startswith("transformer.ln_f")
            p.copy_(1.0 + 0.1 * noise if is_norm and name.endswith("weight") else 0.05 * noise)
    return model.eval()


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def pair(request, tmp_path_factory):
    """(case, HF model, own model loaded from the HF model's safetensors, checkpoint dir)."""
    case: Case = request.param
    torch.manual_seed(0)
    hf = randomize_(case.make_hf(), seed=1)
    return saved_pair(case, hf, tmp_path_factory)


def test_config_from_hf_dict_matches_the_saved_config(pair):
    case, _, _, directory = pair
    raw = json.loads((directory / "config.json").read_text())
    assert config_from_hf_dict(raw, name="x") == case.expected.replace(name="x")


def test_prefill_logits_and_cache_match_hf(pair):
    _, hf, own, _ = pair
    check_prefill(hf, own, VOCAB)


def test_decode_steps_match_hf_with_own_and_with_hf_cache(pair):
    _, hf, own, _ = pair
    check_decode_steps(hf, own, VOCAB)
