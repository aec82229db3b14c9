"""Qwen3, Phi-3, Gemma, Gemma2, SmolLM3, OLMo2, Granite, StableLM: own torch definitions vs transformers.

Per family (tests/models/family_cases.py): a tiny seeded HF model with every parameter randomised is saved as
safetensors and loaded with load_hf_checkpoint; fp32 logits must match (max abs diff <= 1e-4) for a
left-padded prefill with an empty past and three decode steps with a non-empty past, once with each side's own
cache and once with the own model reading HF's cache.
"""
from __future__ import annotations

import json

import pytest

from kvc.models.config import ModelConfig
from kvc.models.loaders.hf import config_from_hf_dict
from tests.models.family_cases import CASES, VOCAB, build_hf
from tests.models.hf_parity import TOL, check_decode_steps, check_prefill, saved_pair

pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def pair(request, tmp_path_factory):
    """(case, HF model, own model loaded from the HF model's safetensors, checkpoint dir)."""
    case = request.param
    hf = build_hf(case)
    return saved_pair(case, hf, tmp_path_factory)


def test_config_from_hf_dict_matches_the_saved_config(pair):
    case, _, _, directory = pair
    raw = json.loads((directory / "config.json").read_text())
    assert config_from_hf_dict(raw, name="x") == case.expected.replace(name="x")


def test_model_config_round_trips_through_json(pair):
    case, _, own, _ = pair
    assert ModelConfig.from_dict(json.loads(own.config.to_json())) == own.config


def test_prefill_logits_and_cache_match_hf(pair):
    _, hf, own, _ = pair
    check_prefill(hf, own, VOCAB)


def test_decode_steps_match_hf_with_own_and_with_hf_cache(pair):
    _, hf, own, _ = pair
    check_decode_steps(hf, own, VOCAB)


# --------------------------------------------------------------------------- presets: export to ONNX
def _export_presets():
    from kvc.models.presets import FAMILY_PRESETS

    presets = dict(FAMILY_PRESETS)
    presets["tiny-gemma2"] = presets["tiny-gemma2"].replace(layer_windows=(4, None))  # windows bind in the graph
    return presets


EXPORT_PRESETS = _export_presets()


@pytest.mark.parametrize("preset", sorted(EXPORT_PRESETS))
def test_preset_export_matches_torch_for_prefill_and_decode(preset, tmp_path, rng):
    """The concat-form ONNX of each family's preset (ONNX Runtime) vs its torch model, left padding included."""
    import numpy as np

    from kvc.models import random_model
    from kvc.models.export import export_onnx
    from tests.models.test_export import ort_session, run_onnx, run_torch

    config = EXPORT_PRESETS[preset]
    model = random_model(config, seed=3)
    export_onnx(model, config, tmp_path / "model.onnx")
    sess = ort_session(tmp_path / "model.onnx")
    ids = rng.integers(0, config.vocab_size, (2, 7), dtype=np.int64)
    mask = np.ones((2, 7), np.int64)
    mask[1, :3] = 0
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)
    past_o = past_t = [(np.zeros((2, config.num_kv_heads, 0, config.resolved_head_dim), np.float32),) * 2
                       for _ in range(config.num_layers)]
    for step in range(5):  # prefill, then 4 decode steps past every window
        got, past_o = run_onnx(sess, config, ids, mask, pos, past_o)
        want, past_t = run_torch(model, ids, mask, pos, past_t)
        rows = mask[:, -ids.shape[1]:].astype(bool)
        np.testing.assert_allclose(got[rows], want[rows], atol=TOL, rtol=0, err_msg=f"step {step}")
        ids = want[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        pos = pos[:, -1:] + 1


@pytest.mark.parametrize("preset", sorted(EXPORT_PRESETS))
def test_num_parameters_counts_the_torch_model(preset):
    from kvc.models import build_model

    config = EXPORT_PRESETS[preset]
    assert config.num_parameters() == sum(p.numel() for p in build_model(config).parameters())


# --------------------------------------------------------------------------- refused, by name
_HF = {"vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
       "num_key_value_heads": 2, "intermediate_size": 96}


@pytest.mark.parametrize("config_json, message", [
    ({"model_type": "phi3", "rope_scaling": {"type": "longrope", "factor": 4.0, "short_factor": [1.0] * 8,
                                             "long_factor": [1.0] * 8}}, "rope scaling 'longrope' is not supported"),
    ({"model_type": "stablelm", "qk_layernorm": True}, "stablelm config with qk_layernorm is not supported"),
    ({"model_type": "stablelm", "use_parallel_residual": True}, "with use_parallel_residual is not supported"),
    ({"model_type": "gemma", "hidden_act": "relu"}, "gemma config with activation 'relu' is not supported"),
    ({"model_type": "qwen3", "hidden_act": "gelu"}, "qwen3 config with hidden_act 'gelu' is not supported"),
    ({"model_type": "gemma2", "layer_types": ["full_attention", "chunked_attention"]}, "gemma2 config has layer_types"),
])
def test_unsupported_family_variants_are_refused_by_name(config_json, message):
    from kvc.errors import CheckpointError

    with pytest.raises(CheckpointError, match=message):
        config_from_hf_dict({**_HF, **config_json})


@pytest.mark.parametrize("change, message", [
    ({"nope_layers": (2,)}, "nope_layers"),
    ({"layer_windows": (4,)}, "layer_windows has 1 entries for 2 layers"),
    ({"layer_windows": (4, 4)}, "use sliding_window"),
    ({"layer_windows": (4, None), "sliding_window": 8}, "not both"),
    ({"partial_rotary_factor": 0.01}, "partial_rotary_factor"),
    ({"attn_logit_softcap": 0.0}, "attn_logit_softcap must be positive"),
])
def test_inconsistent_feature_fields_are_refused(change, message):
    from kvc.errors import CheckpointError

    with pytest.raises(CheckpointError, match=message):
        EXPORT_PRESETS["tiny-qwen3"].replace(**change)
