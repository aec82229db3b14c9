"""The ORT engine binds cache buffers sized to the live context (runtime.live_slots) and still generates
exactly what full-capacity buffers and the torch reference generate: across growth steps, after a
shrink, through the slide wrap-around, for fp32 and int8 caches, with the prefix cache."""
from __future__ import annotations

import pytest

from kvc.runtime import load
from kvc.runtime import ort_engine
from kvc.runtime.generate import OverflowPolicy
from kvc.runtime.live_slots import MIN_SLOTS, slots_for
from kvc.runtime.sampling import SamplingParams
from tests.conftest import torch_greedy


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True)


def test_slots_for_doubles_from_the_minimum_and_stops_at_the_capacity():
    assert slots_for(1, 32768) == MIN_SLOTS
    assert slots_for(MIN_SLOTS, 32768) == MIN_SLOTS
    assert slots_for(MIN_SLOTS + 1, 32768) == 2 * MIN_SLOTS
    assert slots_for(5000, 32768) == 8192
    assert slots_for(700, 600) == 600  # wrapped (slide): the ring's modulus must be the capacity
    assert slots_for(300, 600) == 512
    assert slots_for(513, 600) == 600
    assert slots_for(3, 16) == 16


def test_buffers_grow_with_the_context_and_tokens_equal_torch(exported, compiled):
    torch_model, _, _ = exported("tiny")
    model = load(compiled("tiny", capacity=1000))
    engine = model.engine
    assert engine.live_slots and engine.slots == MIN_SLOTS
    prompt = [(7 * i + 3) % 250 + 1 for i in range(200)]
    result = model.generate(prompt, greedy(120))  # 320 tokens: crosses 256 -> 512 slots
    assert engine.slots == 512
    assert result.token_ids == torch_greedy(torch_model, prompt, 120)
    short = model.generate([5, 6, 7], greedy(8))  # a new short request shrinks the buffers again
    assert engine.slots == MIN_SLOTS
    assert short.token_ids == torch_greedy(torch_model, [5, 6, 7], 8)


@pytest.mark.parametrize("kv_dtype", ["fp32", "int8"])
def test_live_slots_equal_full_capacity_buffers_through_the_slide_wrap(compiled, monkeypatch, kv_dtype):
    """capacity 300: 256 slots, then all 300, then the ring wraps (slide) and the prefix cache is reused."""
    artifact = compiled("tiny", kv_dtype=kv_dtype, capacity=300)
    system = [1] + [(11 * i) % 250 + 2 for i in range(40)]
    prompt = system + [9, 8, 7]

    def run():
        model = load(artifact)
        model.cache_prefix(system)
        out = model.generate(prompt, greedy(330), OverflowPolicy.SLIDE)
        return out.token_ids, model.engine.slots

    live, live_slots = run()
    monkeypatch.setattr(ort_engine, "slots_for", lambda needed, capacity: capacity)
    full, full_slots = run()
    assert (live_slots, full_slots) == (300, 300)
    assert live == full
