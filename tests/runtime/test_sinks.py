"""--on-overflow slide with attention sinks: the first n tokens stay in the ring, the rest slides."""
from __future__ import annotations

import numpy as np
import pytest

from kvc.errors import GenerationError
from kvc.runtime import load
from kvc.runtime.generate import GenerationRun, Overflow, OverflowPolicy
from kvc.runtime.ring_slots import storage_index
from kvc.runtime.sampling import SamplingParams
from kvc.runtime.stopping import FinishReason
from tests.runtime.sink_reference import torch_greedy_with_sinks

CAPACITY = 16
SHORT = [3, 1, 4, 1, 5, 9, 2, 6]  # fits; generation runs well past the capacity
LONG = [(7 * i + 3) % 250 + 1 for i in range(27)]  # longer than the capacity


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True)


def slide(sinks: int) -> Overflow:
    return Overflow(OverflowPolicy.SLIDE, sink_tokens=sinks)


def _visible_tokens(storage: list[int], capacity: int) -> set[int]:
    """numpy copy of kv_ring_buffer._slot_visibility for one single-token step, after running the
    tokens whose storage indices are ``storage`` (the last one being the query): true positions seen."""
    held_by_slot: dict[int, int] = {}
    for true_pos, s in enumerate(storage):
        held_by_slot[s % capacity] = true_pos
    query = storage[-1]
    seen = set()
    for c in range(capacity):
        held = query - ((query - c) % capacity)  # storage index the graph believes slot c holds
        if held >= 0 and query - held >= 0:
            seen.add(held_by_slot[c])
    return seen


@pytest.mark.parametrize("sinks", [0, 1, 3, 15])
def test_storage_indices_keep_sinks_and_the_most_recent_tokens_visible(sinks):
    """Pure check of ring_slots against the graph's mask formula: token t sees exactly the first
    `sinks` tokens and the last capacity - sinks tokens (itself included), for t well past capacity."""
    cap = 16
    storage = [int(s) for s in storage_index(np.arange(5 * cap), cap, sinks)]
    assert storage[:cap] == list(range(cap))
    for t in range(cap, 5 * cap):
        expected = set(range(sinks)) | set(range(t - (cap - sinks) + 1, t + 1))
        assert _visible_tokens(storage[: t + 1], cap) == expected, t
    if sinks == 0:  # the plain sliding window: the slot written is t mod C, as before sinks existed
        assert [s % cap for s in storage] == [t % cap for t in range(5 * cap)]


@pytest.mark.parametrize("sinks", [0, 2, 4])
def test_slide_with_sinks_matches_a_pruned_torch_reference(exported, compiled, sinks):
    torch_model, _, _ = exported("tiny")
    model = load(compiled("tiny", capacity=CAPACITY))
    short = model.generate(SHORT, greedy(40), slide(sinks))
    assert short.token_ids == torch_greedy_with_sinks(torch_model, SHORT, 40, CAPACITY, sinks)
    assert short.finish_reason is FinishReason.LENGTH
    long = model.generate(LONG, greedy(24), slide(sinks))
    assert long.token_ids == torch_greedy_with_sinks(torch_model, LONG, 24, CAPACITY, sinks)
    # bytes in use count true tokens, capped at the capacity (not the storage indices)
    assert long.stats.kv_bytes_in_use == CAPACITY * model.kv_bytes_per_token()


def test_sinks_change_the_tokens(exported, compiled):
    """So that the reference test above proves something: 4 sinks are not the plain window."""
    torch_model, _, _ = exported("tiny")
    model = load(compiled("tiny", capacity=CAPACITY))
    for prompt, steps in ((SHORT, 40), (LONG, 24)):
        plain = model.generate(prompt, greedy(steps), slide(0)).token_ids
        sunk = model.generate(prompt, greedy(steps), slide(4)).token_ids
        assert plain != sunk
        assert plain == torch_greedy_with_sinks(torch_model, prompt, steps, CAPACITY, 0)


def test_bare_policy_is_still_accepted_and_equals_zero_sinks(compiled):
    model = load(compiled("tiny", capacity=CAPACITY))
    bare = model.generate(SHORT, greedy(30), OverflowPolicy.SLIDE).token_ids
    assert bare == model.generate(SHORT, greedy(30), Overflow(OverflowPolicy.SLIDE)).token_ids
    refused = model.generate(SHORT, greedy(30), OverflowPolicy.REFUSE)
    assert refused.finish_reason is FinishReason.LENGTH and len(refused.token_ids) == CAPACITY - len(SHORT) + 1


def test_batched_slide_with_sinks_equals_each_row_alone(compiled):
    """Rows cross the capacity at different steps; each keeps its own sinks and ring."""
    model = load(compiled("tiny", capacity=CAPACITY), max_batch=3)
    prompts = [[1, 2, 3], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20], [7, 7, 7, 7, 7, 7]]
    batched = model.generate(prompts, greedy(30), slide(3))
    alone = [model.generate(p, greedy(30), slide(3)) for p in prompts]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    # stats are per row: each of these rows slid past the capacity, so each holds CAPACITY tokens
    assert [r.stats.kv_bytes_in_use for r in batched] == [CAPACITY * model.kv_bytes_per_token()] * 3


@pytest.mark.parametrize("sinks", [0, 4])
def test_prefix_hit_crossing_the_capacity_equals_a_cold_run(compiled, sinks):
    """prefix + rest > capacity: the rest must not run as one chunk across the capacity (its early
    queries would miss tokens its later ones overwrite); the logits the first token is sampled from
    equal a cold run's."""
    model = load(compiled("tiny", capacity=CAPACITY))
    system = list(range(30, 42))
    prompt = system + [7, 8, 9, 10, 11, 12, 13, 14, 15, 16]  # 12 + 10 > 16
    cold_run = GenerationRun(model.engine, [prompt], greedy(1), (), overflow=slide(sinks))
    cold_logits = cold_run._prefill()
    cold = model.generate(prompt, greedy(20), slide(sinks))
    model.cache_prefix(system)
    warm_run = GenerationRun(model.engine, [prompt], greedy(1), (), overflow=slide(sinks),
                             prefix=model._find_prefix([prompt]))
    np.testing.assert_allclose(warm_run._prefill(), cold_logits, atol=1e-4, rtol=1e-4)
    warm = model.generate(prompt, greedy(20), slide(sinks))
    assert warm.stats.prefix_cache_tokens == len(system)
    assert warm.token_ids == cold.token_ids


def test_sinks_on_the_tvm_engine_match_the_reference(exported, compiled):
    torch_model, _, _ = exported("tiny")
    model = load(compiled("tiny", capacity=CAPACITY, engine="tvm"))
    got = model.generate(LONG, greedy(30), slide(4)).token_ids
    assert got == torch_greedy_with_sinks(torch_model, LONG, 30, CAPACITY, 4)


# --- validation ---

def test_negative_sinks_are_refused():
    with pytest.raises(GenerationError, match="sink_tokens must be >= 0, got -1"):
        Overflow(OverflowPolicy.SLIDE, sink_tokens=-1)


def test_sinks_need_the_slide_policy():
    with pytest.raises(GenerationError, match="sinks only apply with --on-overflow slide"):
        Overflow(OverflowPolicy.REFUSE, sink_tokens=2)
    with pytest.raises(GenerationError, match="sinks only apply with --on-overflow slide"):
        Overflow(sink_tokens=2)


def test_non_integer_sinks_and_unknown_policies_are_refused(compiled):
    with pytest.raises(GenerationError, match="sink_tokens must be an integer"):
        Overflow(OverflowPolicy.SLIDE, sink_tokens=2.5)
    with pytest.raises(GenerationError, match="overflow policy must be one of refuse, slide"):
        Overflow("wrap")
    model = load(compiled("tiny", capacity=CAPACITY))
    with pytest.raises(GenerationError, match="overflow must be an Overflow or an OverflowPolicy"):
        model.generate(SHORT, greedy(4), "slide")


@pytest.mark.parametrize("sinks", [CAPACITY, CAPACITY + 5])
def test_sinks_must_leave_a_ring_slot(compiled, sinks):
    model = load(compiled("tiny", capacity=CAPACITY))
    with pytest.raises(GenerationError, match=f"sink_tokens={sinks} leaves no ring slot in the KV-cache capacity "
                                              f"of {CAPACITY}; use at most {CAPACITY - 1} sink tokens"):
        model.generate(SHORT, greedy(4), slide(sinks))
    assert len(model.generate(SHORT, greedy(30), slide(CAPACITY - 1)).token_ids) == 30  # one ring slot is enough


def test_sinks_are_refused_for_a_model_with_a_narrower_window(compiled):
    model = load(compiled("tiny-mistral", capacity=CAPACITY))  # its own sliding window: 8 tokens
    assert model.manifest.cache.sliding_window == 8
    with pytest.raises(GenerationError, match="own sliding window of 8 tokens \\(< capacity 16\\)"):
        model.generate(SHORT, greedy(4), slide(2))
    assert len(model.generate(SHORT, greedy(30), slide(0)).token_ids) == 30  # plain slide still works
