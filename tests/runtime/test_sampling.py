"""Sampling processors vs transformers' logits processors; seeded sampling; parameter validation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from kvc.errors import GenerationError
from kvc.runtime.sampling import (
    Sampler,
    SamplingParams,
    apply_min_p,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    sampling_probs,
)

BATCH, VOCAB, PROMPT = 4, 64, 12


@pytest.fixture
def case(rng):
    logits = (rng.standard_normal((BATCH, VOCAB)) * 3).astype(np.float32)
    history = rng.integers(0, VOCAB, size=(BATCH, PROMPT))
    return logits, history


def hf_probs(processor, logits: np.ndarray, history: np.ndarray) -> np.ndarray:
    scores = processor(torch.from_numpy(history), torch.from_numpy(logits.copy()))
    return torch.softmax(scores.double(), dim=-1).numpy()


def own_probs(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits.astype(np.float64) - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def assert_same_distribution(ours: np.ndarray, theirs: np.ndarray) -> None:
    np.testing.assert_array_equal(ours > 0, theirs > 0, err_msg="surviving tokens differ")
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_hf(case, penalty):
    logits, history = case
    ours = apply_repetition_penalty(logits, history.tolist(), penalty)
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(torch.from_numpy(history), torch.from_numpy(logits.copy()))
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6, atol=1e-6)
    assert not np.allclose(ours, logits)


@pytest.mark.parametrize("temperature", [0.3, 1.7])
def test_temperature_matches_hf(case, temperature):
    logits, history = case
    assert_same_distribution(
        own_probs(apply_temperature(logits, temperature)),
        hf_probs(TemperatureLogitsWarper(temperature), logits, history),
    )


@pytest.mark.parametrize("top_k", [1, 5, 40, VOCAB + 10])
def test_top_k_matches_hf(case, top_k):
    logits, history = case
    ours = own_probs(apply_top_k(logits, top_k))
    assert_same_distribution(ours, hf_probs(TopKLogitsWarper(top_k), logits, history))
    assert ((ours > 0).sum(axis=-1) == min(top_k, VOCAB)).all()


def test_top_k_keeps_ties_at_the_boundary_like_hf():
    logits = np.array([[0.0, 2.0, 1.0, 2.0, 1.0, -1.0]], dtype=np.float32)
    ours = own_probs(apply_top_k(logits, 2))
    assert_same_distribution(ours, hf_probs(TopKLogitsWarper(2), logits, np.zeros((1, 1), dtype=np.int64)))
    assert (ours > 0).sum() == 2
    ours = own_probs(apply_top_k(logits, 3))
    assert (ours > 0).sum() == 4  # both 1.0 logits tie for third place


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_matches_hf(case, top_p):
    logits, history = case
    ours = own_probs(apply_top_p(logits, top_p))
    assert_same_distribution(ours, hf_probs(TopPLogitsWarper(top_p), logits, history))


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5, 0.99])
def test_min_p_matches_hf(case, min_p):
    logits, history = case
    ours = own_probs(apply_min_p(logits, min_p))
    assert_same_distribution(ours, hf_probs(MinPLogitsWarper(min_p), logits, history))


def test_processor_chain_matches_hf_in_hf_order(case):
    logits, history = case
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.2, seed=0)
    chain = [
        RepetitionPenaltyLogitsProcessor(1.2),
        TemperatureLogitsWarper(0.8),
        TopKLogitsWarper(20),
        TopPLogitsWarper(0.9),
        MinPLogitsWarper(0.05),
    ]
    scores = torch.from_numpy(logits.copy())
    for processor in chain:
        scores = processor(torch.from_numpy(history), scores)
    theirs = torch.softmax(scores.double(), dim=-1).numpy()
    assert_same_distribution(sampling_probs(logits, history.tolist(), params), theirs)


def test_greedy_is_argmax_with_lowest_id_on_ties():
    logits = np.array([[0.0, 3.0, 3.0, 1.0], [5.0, -1.0, 5.0, 5.0]], dtype=np.float32)
    tokens = Sampler(SamplingParams(temperature=0.0), batch_size=2).sample(logits, [[], []])
    np.testing.assert_array_equal(tokens, torch.argmax(torch.from_numpy(logits), dim=-1).numpy())
    np.testing.assert_array_equal(tokens, [1, 0])
    assert tokens.dtype == np.int64


def test_greedy_applies_repetition_penalty():
    logits = np.array([[2.0, 1.9, -5.0]], dtype=np.float32)
    tokens = Sampler(SamplingParams(temperature=0.0, repetition_penalty=1.5), 1).sample(logits, [[0, 0]])
    assert tokens.tolist() == [1]


@pytest.mark.parametrize(
    "params",
    [SamplingParams(seed=7), SamplingParams(temperature=0.7, top_k=3, seed=7)],
    ids=["plain", "temperature-top-k"],
)
def test_sampling_frequencies_match_target_distribution(params):
    draws = 20_000
    logits = np.log(np.array([[0.4, 0.25, 0.2, 0.1, 0.05]], dtype=np.float32))
    target = sampling_probs(logits, [[]], params)[0]
    sampler = Sampler(params, batch_size=1)
    counts = np.bincount([int(sampler.sample(logits, [[]])[0]) for _ in range(draws)], minlength=5)
    observed, expected = counts[target > 0], draws * target[target > 0]
    chi_square = ((observed - expected) ** 2 / expected).sum()
    assert counts[target == 0].sum() == 0
    # 4 degrees of freedom at most: P(chi2 > 30) ~ 5e-6 for a correct sampler.
    assert chi_square < 30, f"chi-square {chi_square:.1f}: counts {counts} vs expected {draws * target}"


def run_sampler(params: SamplingParams, logits_steps: np.ndarray, first_sequence_index: int = 0) -> np.ndarray:
    sampler = Sampler(params, batch_size=logits_steps.shape[1], first_sequence_index=first_sequence_index)
    histories = [[] for _ in range(logits_steps.shape[1])]
    for step_logits in logits_steps:
        for history, token in zip(histories, sampler.sample(step_logits, histories)):
            history.append(int(token))
    return np.array(histories)


@pytest.fixture
def steps(rng):
    return rng.standard_normal((30, 3, 50)).astype(np.float32)  # [steps, batch, vocab]


def test_same_seed_same_tokens_and_other_seed_other_tokens(steps):
    params = SamplingParams(temperature=1.0, top_p=0.95, repetition_penalty=1.1, seed=42)
    first, again = run_sampler(params, steps), run_sampler(params, steps)
    np.testing.assert_array_equal(first, again)
    other = run_sampler(SamplingParams(temperature=1.0, top_p=0.95, repetition_penalty=1.1, seed=43), steps)
    assert (first != other).any()


def test_batched_sampling_equals_sampling_each_sequence_alone(steps):
    params = SamplingParams(temperature=0.9, top_k=10, seed=3)
    batched = run_sampler(params, steps)
    for row in range(steps.shape[1]):
        alone = run_sampler(params, steps[:, row : row + 1], first_sequence_index=row)
        np.testing.assert_array_equal(batched[row], alone[0])
    assert (batched[0] != batched[1]).any(), "sequences of one request must not share a random stream"


def test_sampler_rejects_logits_of_another_batch_size():
    with pytest.raises(ValueError, match="expected logits"):
        Sampler(SamplingParams(seed=0), batch_size=2).sample(np.zeros((3, 8), np.float32), [[], [], []])


@pytest.mark.parametrize(
    "name, value",
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("top_k", 2.5),
        ("min_p", 1.0),
        ("min_p", -0.2),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("max_new_tokens", 0),
        ("seed", -5),
        ("stop_strings", ("",)),
        ("stop_token_ids", (-1,)),
        ("ignore_eos", "yes"),
    ],
)
def test_invalid_params_raise_generation_error_naming_the_parameter(name, value):
    with pytest.raises(GenerationError, match=name):
        SamplingParams(**{name: value})


def test_valid_params_are_normalised_to_tuples():
    params = SamplingParams(stop_strings=["\n\n"], stop_token_ids=[2], seed=1)
    assert params.stop_strings == ("\n\n",) and params.stop_token_ids == (2,)
    assert SamplingParams(temperature=0).greedy
