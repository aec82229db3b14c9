"""Generation through the ORT engine vs the PyTorch reference, batching, prefix cache, capacity."""
from __future__ import annotations

import numpy as np
import pytest

from kvc.errors import GenerationError
from kvc.runtime import load
from kvc.runtime.generate import OverflowPolicy
from kvc.runtime.sampling import SamplingParams
from kvc.runtime.stopping import FinishReason
from tests.conftest import torch_greedy

GREEDY_64 = SamplingParams(temperature=0.0, max_new_tokens=64, ignore_eos=True)


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2", "tiny-mistral", "tiny-gpt2"])
def test_greedy_64_tokens_equal_torch(exported, compiled, preset):
    model, config, _ = exported(preset)
    kvc_model = load(compiled(preset, capacity=128))
    prompt = [5, 17, 99, 3, 42, 8, 200]
    result = kvc_model.generate(prompt, GREEDY_64)
    assert result.token_ids == torch_greedy(model, prompt, 64)
    assert result.finish_reason is FinishReason.LENGTH


def test_batched_generation_equals_each_prompt_alone(compiled):
    model = load(compiled("tiny"), max_batch=3)
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [10, 11], [7, 7, 7, 7, 7]]
    params = SamplingParams(temperature=0.0, max_new_tokens=20, ignore_eos=True)
    batched = model.generate(prompts, params)
    alone = [model.generate(p, params) for p in prompts]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]


def test_prefix_cache_gives_identical_tokens_to_a_cold_run(compiled):
    model = load(compiled("tiny"))
    system = [1, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40]
    prompt = system + [77, 78, 79]
    params = SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True)
    cold = model.generate(prompt, params)
    assert model.cache_prefix(system) == len(system)
    warm = model.generate(prompt, params)
    assert warm.stats.prefix_cache_tokens == len(system)
    assert warm.token_ids == cold.token_ids


def test_same_seed_same_sample_and_other_seed_differs(compiled):
    model = load(compiled("tiny"))
    def sample(seed):
        return model.generate([1, 2, 3], SamplingParams(temperature=1.5, top_k=50, seed=seed,
                                                        max_new_tokens=32, ignore_eos=True)).token_ids
    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_prompt_over_capacity_is_refused_up_front(compiled):
    model = load(compiled("tiny", capacity=16))
    with pytest.raises(GenerationError, match="exceeds the KV-cache capacity of 16"):
        model.generate(list(range(1, 20)), GREEDY_64)


def test_generation_stops_at_capacity_with_length(compiled):
    model = load(compiled("tiny", capacity=16))
    result = model.generate([1, 2, 3, 4], SamplingParams(temperature=0.0, max_new_tokens=100, ignore_eos=True))
    assert result.finish_reason is FinishReason.LENGTH
    assert len(result.token_ids) == 16 - 4 + 1  # the last token needs no cache slot


def test_slide_policy_matches_a_sliding_window_reference(exported, compiled):
    """With --on-overflow slide the ring wraps: tokens must equal a torch model that attends
    only to the last `capacity` tokens (a sliding window of the capacity)."""
    torch_model, config, _ = exported("tiny")
    capacity = 16
    model = load(compiled("tiny", capacity=capacity))
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    got = model.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=30, ignore_eos=True),
                         OverflowPolicy.SLIDE).token_ids
    from kvc.models import build_model

    windowed = build_model(config.replace(sliding_window=capacity))
    windowed.load_state_dict(torch_model.state_dict())
    windowed.eval()
    assert got == torch_greedy(windowed, prompt, 30)


def test_caches_are_updated_in_place(compiled, capfd):
    from kvc.runtime.model import LoadOptions, load as load_with
    from kvc.runtime.ort_engine import OrtEngine, OrtEngineOptions
    from kvc.runtime.artifact import validate_artifact

    root = compiled("tiny")
    engine = OrtEngine(root, validate_artifact(root), OrtEngineOptions(log_severity=1))
    addresses = {n: a.ctypes.data for n, a in engine.caches.items()}
    before = {n: a.copy() for n, a in engine.caches.items()}
    engine.forward(np.array([[1, 2, 3]]), np.array([[0, 1, 2]]), np.array([0]))
    engine.forward(np.array([[4]]), np.array([[3]]), np.array([3]))
    assert {n: a.ctypes.data for n, a in engine.caches.items()} == addresses
    for name, cache in engine.caches.items():
        assert not np.array_equal(cache[:, :, :4], before[name][:, :, :4]), f"{name} was not written in place"
        assert np.all(cache[:, :, 4:] == 0)
    assert "in-place optimization not activated" not in capfd.readouterr().err
