"""The continuous-batching scheduler against generate() run alone: same greedy tokens whatever the
interleaving (chunked prefill, packed or holey rows, shared prefixes, cancels), rows freed, backpressure."""
from __future__ import annotations

import queue
import random
import time

import numpy as np
import pytest

import kvc
from kvc.errors import GenerationError
from kvc.runtime.sampling import SamplingParams
from kvc.runtime.scheduler import PromptTooLong, QueueFull, Scheduler, SchedulerOptions
from kvc.runtime.serving_request import EndReason


def _prompts(count: int, longest: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = [[1] + [rng.randrange(3, 256) for _ in range(rng.randrange(1, longest))] for _ in range(count)]
    # later prompts share the head of earlier ones: the prefix store serves those tokens
    return prompts + [p[: len(p) // 2 + 1] + [7, 8, 9] for p in prompts[: count // 3]]


def _submit(scheduler, prompt, params, timeout_s=None):
    events = queue.Queue()
    request = scheduler.new_request(prompt, params, events.put, timeout_s)
    scheduler.submit(request)
    return request, events


def _until(condition, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the scheduler"
        time.sleep(0.005)


def _wait(events, timeout_s=60.0):
    texts = []
    while True:
        event = events.get(timeout=timeout_s)
        texts.append(event.text)
        if event.end is not None:
            return event, "".join(texts)


@pytest.fixture(scope="module")
def artifact(compiled):
    return compiled("tiny", capacity=64)


@pytest.mark.parametrize("compact", [True, False], ids=["packed", "holes"])
def test_interleaved_requests_equal_generate_alone(artifact, compact):
    alone = kvc.load(artifact)
    scheduler = Scheduler(kvc.load(artifact, max_batch=4),
                          SchedulerOptions(prefill_chunk=5, min_prefix_match=2, compact=compact)).start()
    rng = random.Random(1)
    try:
        jobs = []
        for prompt in _prompts(24, 40):
            params = SamplingParams(temperature=0.0, max_new_tokens=rng.randrange(1, 30))
            jobs.append((prompt, params, *_submit(scheduler, prompt, params)))
        for prompt, params, request, events in jobs:
            last, _ = _wait(events)
            ref = alone.generate(prompt, params)
            assert request.generated == ref.token_ids
            assert last.end.value == ref.finish_reason.value
        snap = scheduler.stats.snapshot()
        assert snap.prefix_tokens > 0 and snap.decode_rows > snap.decode_steps  # shared prefixes, real batches
        assert (scheduler.rows.moves > 0) == compact
        assert snap.rows_busy == 0 and snap.queue_depth == 0 and snap.kv_slots_in_use == 0
    finally:
        scheduler.close()


def test_seeded_sampling_equals_generate_alone(artifact):
    alone = kvc.load(artifact)
    scheduler = Scheduler(kvc.load(artifact, max_batch=3), SchedulerOptions(prefill_chunk=8)).start()
    try:
        jobs = []
        for i, prompt in enumerate(_prompts(6, 20, seed=3)):
            params = SamplingParams(temperature=0.8, top_k=40, seed=i, max_new_tokens=12)
            jobs.append((prompt, params, *_submit(scheduler, prompt, params)))
        for prompt, params, request, events in jobs:
            _wait(events)
            assert request.generated == alone.generate(prompt, params).token_ids
    finally:
        scheduler.close()


def test_cancel_frees_the_row_and_leaves_others_intact(artifact):
    alone = kvc.load(artifact)
    scheduler = Scheduler(kvc.load(artifact, max_batch=3), SchedulerOptions(prefill_chunk=4)).start()
    try:
        long = SamplingParams(temperature=0.0, max_new_tokens=50, ignore_eos=True)
        doomed, doomed_events = _submit(scheduler, [1, 5, 6], long)
        _until(lambda: len(doomed.generated) > 0)  # generating (no tokenizer: no text events)
        keep = [[1, 9, 10, 11], [1, 20, 21]]
        kept = [_submit(scheduler, p, long) for p in keep]
        doomed.cancel()
        last, _ = _wait(doomed_events)
        assert last.end is EndReason.CANCELLED and len(doomed.generated) < 50
        for prompt, (request, events) in zip(keep, kept):
            _wait(events)
            assert request.generated == alone.generate(prompt, long).token_ids
    finally:
        scheduler.close()


def test_timeout_in_queue_and_while_generating(artifact):
    model = kvc.load(artifact, max_batch=2)  # one decode row
    forward = model.engine.forward
    model.engine.forward = lambda *args: (time.sleep(0.02), forward(*args))[1]  # 64 steps take > 1 s
    scheduler = Scheduler(model, SchedulerOptions()).start()
    try:
        slow = SamplingParams(temperature=0.0, max_new_tokens=10_000, ignore_eos=True)
        running, running_events = _submit(scheduler, [1, 4], slow, timeout_s=0.5)
        waiting, waiting_events = _submit(scheduler, [1, 5], slow, timeout_s=0.2)
        assert _wait(waiting_events)[0].end is EndReason.TIMEOUT and waiting.first_token_at is None
        last, _ = _wait(running_events)
        assert last.end is EndReason.TIMEOUT and 0 < len(running.generated) < 60
    finally:
        scheduler.close()


def test_bounded_queue_refuses_the_excess(artifact):
    scheduler = Scheduler(kvc.load(artifact, max_batch=2), SchedulerOptions(max_queue=3))  # not started
    params = SamplingParams(temperature=0.0, max_new_tokens=2)
    for _ in range(3):
        _submit(scheduler, [1, 2], params)
    with pytest.raises(QueueFull, match="max_queue=3"):
        _submit(scheduler, [1, 2], params)
    scheduler.start()
    scheduler.close()  # ends the waiting requests with an error instead of leaving them hanging


def test_prompt_checks(artifact):
    scheduler = Scheduler(kvc.load(artifact, max_batch=2))
    params = SamplingParams(temperature=0.0)
    with pytest.raises(PromptTooLong, match="capacity of 64"):
        scheduler.new_request([1] * 65, params, lambda e: None)
    with pytest.raises(Exception, match="outside the vocabulary"):
        scheduler.new_request([1, 256], params, lambda e: None)


def test_engine_failure_ends_active_requests_and_serving_goes_on(artifact):
    alone = kvc.load(artifact)
    model = kvc.load(artifact, max_batch=3)
    scheduler = Scheduler(model, SchedulerOptions()).start()
    real_forward = model.engine.forward
    calls = {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated engine fault")
        return real_forward(*args)

    model.engine.forward = flaky
    try:
        params = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
        _, events = _submit(scheduler, [1, 30, 31], params)
        last, _ = _wait(events)
        assert last.end is EndReason.ERROR and "simulated engine fault" in last.message
        request, events = _submit(scheduler, [1, 40], params)
        _wait(events)
        assert request.generated == alone.generate([1, 40], params).token_ids
    finally:
        scheduler.close()


def test_rows_longer_than_the_smallest_binding_survive_a_short_prefill(compiled):
    """ORT artifacts bind cache buffers sized to the live context; a prefill call over row 0 alone
    must not truncate a decode row holding more tokens than that call needs."""
    artifact = compiled("tiny", capacity=640)
    alone = kvc.load(artifact)
    model = kvc.load(artifact, max_batch=3)
    scheduler = Scheduler(model, SchedulerOptions(prefill_chunk=512)).start()
    rng = np.random.default_rng(0)
    try:
        params = SamplingParams(temperature=0.0, max_new_tokens=40, ignore_eos=True)
        long_prompt = [1] + rng.integers(3, 256, 299).tolist()
        long_request, long_events = _submit(scheduler, long_prompt, params)
        _until(lambda: len(long_request.generated) > 0)
        short_request, short_events = _submit(scheduler, [1, 3, 4], params)
        _wait(long_events)
        _wait(short_events)
        assert long_request.generated == alone.generate(long_prompt, params).token_ids
        assert short_request.generated == alone.generate([1, 3, 4], params).token_ids
    finally:
        scheduler.close()


def test_model_driven_by_a_scheduler_refuses_its_own_runs_until_closed(artifact):
    model = kvc.load(artifact, max_batch=2)
    params = SamplingParams(temperature=0.0, max_new_tokens=4)
    scheduler = Scheduler(model, SchedulerOptions()).start()
    try:
        with pytest.raises(GenerationError, match="driven by kvc serve's scheduler"):
            model.generate([1, 4], params)
        with pytest.raises(GenerationError, match="driven by kvc serve's scheduler"):
            model.decode(np.array([1]), np.array([0]))
        with pytest.raises(GenerationError, match="driven by kvc serve's scheduler"):
            Scheduler(model, SchedulerOptions()).start()  # a second driver of the same rows
        request, events = _submit(scheduler, [1, 4], params)
        _wait(events)
    finally:
        scheduler.close()
    _until(lambda: not scheduler._thread.is_alive())
    assert model.generate([1, 4], params).token_ids == request.generated  # the model is free again


def test_scheduler_does_not_start_on_a_model_that_is_generating(artifact):
    model = kvc.load(artifact, max_batch=2)
    stream = model.stream([1, 4], SamplingParams(temperature=0.0, max_new_tokens=8))
    next(stream)  # the run holds the model
    with pytest.raises(GenerationError, match="running a generation"):
        Scheduler(model, SchedulerOptions()).start()
    stream.close()
    Scheduler(model, SchedulerOptions()).start().close()
