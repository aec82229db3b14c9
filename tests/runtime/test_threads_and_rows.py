"""One loaded model from several threads / interleaved streams; finished batch rows leave the engine
batch; per-row stats; the TVM engine touches one row in read/write_slots; TVM's pool is sized once."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from kvc.errors import GenerationError, KvcError
from kvc.runtime import load
from kvc.runtime.sampling import SamplingParams

ENGINES = ["ort", "tvm"]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
PROMPTS = [[1, 5, 9], [1, 30, 31, 32, 33], [1, 100], [1, 7, 7, 7]]


@pytest.fixture(scope="module", params=ENGINES)
def model(request, compiled):
    return load(compiled("tiny", capacity=32, engine=request.param), max_batch=2)


def test_threads_sharing_a_model_get_sequential_results(model):
    """dea640d: ORT gave silently wrong tokens (two runs writing row 0 at once), TVM could crash."""
    expected = [model.generate(p, GREEDY).token_ids for p in PROMPTS]
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(PROMPTS) * 2)

    def worker(index: int) -> None:
        try:
            start.wait()
            for _ in range(2):
                got = model.generate(PROMPTS[index % len(PROMPTS)], GREEDY).token_ids
                results.setdefault(index, got)
                assert got == results[index]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(PROMPTS) * 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert [results[i] for i in range(len(PROMPTS))] == expected
    assert [results[i + len(PROMPTS)] for i in range(len(PROMPTS))] == expected


def test_streams_in_other_threads_wait_and_stay_correct(model):
    """Each thread streams the same prompt: every run's tokens equal a run alone (no shared-row mixing)."""
    expected = model.generate(PROMPTS[1], GREEDY).token_ids
    ids: dict[int, list[int]] = {}

    def consume(index: int) -> None:
        events = list(model.stream(PROMPTS[1], GREEDY))
        assert events[-1].finish_reason is not None
        ids[index] = model.last_result.token_ids  # all threads run the same prompt: any result must match

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ids == {i: expected for i in range(3)}


def test_a_second_run_while_this_threads_stream_is_suspended_is_refused(model):
    """dea640d interleaved both runs on cache row 0: the first stream continued from the second's KV."""
    expected = model.generate(PROMPTS[0], GREEDY).token_ids
    first = model.stream(PROMPTS[0], GREEDY)
    next(first)
    with pytest.raises(GenerationError, match="already running a generation on this thread"):
        model.generate(PROMPTS[1], GREEDY)
    second = model.stream(PROMPTS[1], GREEDY)
    with pytest.raises(GenerationError, match="already running"):
        next(second)
    for _ in first:
        pass
    assert model.last_result.token_ids == expected
    assert model.generate(PROMPTS[0], GREEDY).token_ids == expected  # the lock was released


def test_a_closed_stream_releases_the_model(model):
    stream = model.stream(PROMPTS[0], GREEDY)
    next(stream)
    stream.close()
    assert len(model.generate(PROMPTS[0], GREEDY).token_ids) == GREEDY.max_new_tokens


# --- batch rows ----------------------------------------------------------------------------------------

def test_finished_rows_leave_the_engine_batch(model):
    """dea640d kept decoding every row until the last one finished."""
    long, short = PROMPTS[1], PROMPTS[0]
    alone_long = model.generate(long, GREEDY).token_ids
    alone_short = model.generate(short, GREEDY).token_ids
    stop_at = alone_short[2]  # row 0 (short) stops on its third token; row 1 must run on alone
    assert stop_at not in alone_long, "pick prompts whose outputs differ"
    params = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True, stop_token_ids=[stop_at])
    widths = []
    forward = model.engine.forward

    def recording(ids, positions, past_len):
        widths.append(ids.shape[0])
        return forward(ids, positions, past_len)

    model.engine.forward = recording
    try:
        short_result, long_result = model.generate([short, long], params)
    finally:
        del model.engine.forward
    assert short_result.token_ids == alone_short[:2] and long_result.token_ids == alone_long
    # prefill (2 rows), 2 decode steps with both rows, then only the long row (moved to engine row 0)
    assert widths == [2, 2, 2] + [1] * (len(alone_long) - 3), widths


def test_each_row_reports_its_own_counts(model):
    """dea640d gave every row the batch's totals."""
    results = model.generate([PROMPTS[0], PROMPTS[1]], SamplingParams(temperature=0.0, max_new_tokens=5,
                                                                        ignore_eos=True))
    assert [r.stats.prompt_tokens for r in results] == [len(PROMPTS[0]), len(PROMPTS[1])]
    assert [r.stats.generated_tokens for r in results] == [5, 5]
    per_token = model.kv_bytes_per_token()
    assert [r.stats.kv_bytes_in_use for r in results] == [(len(PROMPTS[0]) + 4) * per_token,
                                                          (len(PROMPTS[1]) + 4) * per_token]
    assert all(r.stats.to_dict()["timings_shared_by_batch"] for r in results)


# --- TVM engine ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tvm_model(compiled):
    return load(compiled("tiny", capacity=32, engine="tvm"), max_batch=3)


def test_tvm_slots_touch_only_their_row(tvm_model, monkeypatch):
    """dea640d copied every whole cache to the host (and back) to read or write one row."""
    import tvm

    engine = tvm_model.engine
    rng = np.random.default_rng(0)
    before = [engine._row(n, 0).numpy().copy() for n in engine.cache_inputs]
    shapes = []
    original = tvm.runtime.Tensor.numpy

    def recording(self, *args, **kwargs):
        shapes.append(tuple(self.shape))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tvm.runtime.Tensor, "numpy", recording)
    tensors = [rng.standard_normal(t.shape[:1] + (5,) + t.shape[2:]).astype(np.float32)
               for t in tvm_model.engine.read_slots(1, 5)]
    engine.write_slots(2, tensors)
    got = engine.read_slots(2, 5)
    assert all(np.array_equal(a, b) for a, b in zip(got, tensors))
    assert all(len(s) == 3 for s in shapes), shapes  # [kv_heads, C, D] rows, never [max_batch, ...]
    monkeypatch.undo()
    assert all(np.array_equal(engine._row(n, 0).numpy(), b) for n, b in zip(engine.cache_inputs, before))


def test_tvm_thread_pool_is_configured_once(tvm_model):
    """dea640d re-configured the process-wide pool on every load."""
    import kvc.runtime.tvm_engine as te

    assert te._pool_threads is not None
    te.configure_threads(0)  # the default count: accepted, no reconfiguration
    te.configure_threads(te._pool_threads)
    with pytest.raises(KvcError, match="process-wide"):
        te.configure_threads(te._pool_threads + 1)
