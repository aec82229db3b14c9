"""The fair torch baseline and the synthetic prefill of `kvc bench`.

torch-static (static preallocated cache, index writes) must give the concat model's logits;
a synthetic fill must leave in the cache exactly the rows it wrote, give finite, repeatable
logits, and (fp32) the same next-step logits on every engine handed the same K/V rows.
No timing is asserted."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvc.compiler.bench import BenchConfig, EngineName
from kvc.compiler.bench.measure import fill, greedy_decode, random_prompt, synthetic_fill, tile_slots
from kvc.compiler.bench.runners import TorchRunner, TorchStaticRunner, concat_kv_bytes_per_token
from kvc.compiler.bench.sources import plan_source
from kvc.compiler.bench.torch_static import StaticKVCache, static_forward
from kvc.models import empty_past, random_model
from kvc.models.presets import RANDOM_PRESETS

# fp32 everywhere; SDPA vs the unfused matmul-softmax-matmul differ by reassociation only.
STATIC_ATOL, STATIC_RTOL = 1e-5, 1e-4


def _concat_logits(model, ids: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    past, start, out = empty_past(model.config, ids.shape[0]), 0, []
    with torch.no_grad():
        for n in chunks:
            total = start + n
            positions = torch.arange(start, total).expand(ids.shape[0], n)
            logits, past = model(ids[:, start:total], torch.ones(ids.shape[0], total, dtype=torch.long),
                                 positions, past)
            out.append(logits)
            start = total
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2", "tiny-mistral", "tiny-gpt2"])
def test_static_cache_gives_the_concat_models_logits(preset):
    """Prefill in two chunks then single-token decode steps, batch 2: the window of tiny-mistral (8)
    is crossed, tiny-qwen2 is MQA, tiny-gpt2 has learned positions."""
    model = random_model(RANDOM_PRESETS[preset])
    ids = torch.from_numpy(random_prompt(256, 2, 20, seed=5))
    chunks = [7, 5] + [1] * 8
    want = _concat_logits(model, ids, chunks)
    cache = StaticKVCache.allocate(model.config, batch=2, capacity=32)
    got, start = [], 0
    for n in chunks:
        got.append(static_forward(model, cache, ids[:, start:start + n], start))
        start += n
    torch.testing.assert_close(torch.cat(got, dim=1), want, atol=STATIC_ATOL, rtol=STATIC_RTOL)


def test_static_cache_refuses_to_overflow():
    model = random_model(RANDOM_PRESETS["tiny"])
    cache = StaticKVCache.allocate(model.config, batch=1, capacity=4)
    with pytest.raises(ValueError, match="4 slots"):
        static_forward(model, cache, torch.zeros(1, 5, dtype=torch.long), 0)


def test_tile_slots_repeats_along_the_slot_axis():
    rows = {"a": np.arange(2 * 1 * 3 * 2).reshape(2, 1, 3, 2)}
    tiled = tile_slots(rows, 7)["a"]
    assert tiled.shape == (2, 1, 7, 2)
    np.testing.assert_array_equal(tiled[:, :, 3:6], rows["a"])
    np.testing.assert_array_equal(tiled[:, :, 6], rows["a"][:, :, 0])


@pytest.fixture(scope="module")
def tiny_slots(tmp_path_factory):
    work = tmp_path_factory.mktemp("fill-work")
    config = BenchConfig(contexts=(40,), gen=4, batch=2, kv_dtypes=("fp32", "int8", "fp8"), work_dir=work,
                         engines=(EngineName.KVC_ORT, EngineName.ORT_CONCAT, EngineName.TORCH_CONCAT,
                                  EngineName.TORCH_STATIC))
    return {slot.label: slot for slot in plan_source("tiny", config, work).slots}


LABELS = ["kvc-ort/fp32", "kvc-ort/int8", "kvc-ort/fp8", "ort-concat/fp32", "torch-concat/fp32",
          "torch-static/fp32"]


@pytest.mark.parametrize("label", LABELS)
def test_synthetic_fill_writes_what_it_says_and_decodes_repeatably(tiny_slots, label):
    runner = tiny_slots[label].open()
    prompt = random_prompt(256, 2, 40, seed=11)
    logits = synthetic_fill(runner, prompt, chunk=8, seed_tokens=12)
    assert runner.length == 40
    seed_rows = runner.read_cache(12)
    held = runner.read_cache(40)
    for name, rows in tile_slots(seed_rows, 40).items():  # the tiled real K/V, stored dtype, scales included
        np.testing.assert_array_equal(held[name], rows, err_msg=name)
        assert held[name].shape[:3] == (2, rows.shape[1], 40)
    first = np.stack(greedy_decode(runner, logits, 3))
    runner.rewind(40)
    out = runner.step(first[0][:, None])
    assert np.all(np.isfinite(out))
    runner.rewind(40)
    np.testing.assert_array_equal(np.stack(greedy_decode(runner, logits, 3)), first)


def test_same_kv_rows_give_the_same_next_logits_on_every_fp32_engine(tiny_slots):
    """Rows written by a synthetic fill stand in for a real prefill: every fp32 engine handed the
    same rows computes the same next-step logits (within fp32 reassociation)."""
    reference = tiny_slots["torch-concat/fp32"].open()
    prompt = random_prompt(256, 2, 40, seed=12)
    synthetic_fill(reference, prompt, chunk=8, seed_tokens=12)
    rows = reference.read_cache(40)
    token = np.array([[3], [7]], np.int64)
    want = reference.step(token)
    for label in ("kvc-ort/fp32", "ort-concat/fp32", "torch-static/fp32"):
        runner = tiny_slots[label].open()
        fill(runner, prompt[:, :4], 4)  # allocate the engine's cache for this batch first
        runner.write_cache(rows)
        assert runner.length == 40
        np.testing.assert_allclose(runner.step(token), want, rtol=1e-4, atol=1e-5, err_msg=label)


def test_real_prefill_and_synthetic_fill_agree_up_to_the_seed_length(tiny_slots):
    """A synthetic fill no deeper than its seed is a real prefill."""
    runner = tiny_slots["torch-static/fp32"].open()
    prompt = random_prompt(256, 2, 10, seed=13)
    synthetic = synthetic_fill(runner, prompt, chunk=4, seed_tokens=16)
    rows = runner.read_cache(10)
    runner.rewind(0)
    real = fill(runner, prompt, 4)
    np.testing.assert_array_equal(synthetic, real)
    for name, array in runner.read_cache(10).items():
        np.testing.assert_array_equal(array, rows[name])


def test_kv_bytes_per_token_come_from_the_buffers(tiny_slots):
    config = RANDOM_PRESETS["tiny"]
    fp32 = concat_kv_bytes_per_token(config)
    assert fp32 == 2 * 2 * 2 * 16 * 4
    sizes = {label: tiny_slots[label].open().kv_bytes_per_token() for label in LABELS}
    assert sizes["kvc-ort/fp32"] == sizes["ort-concat/fp32"] == sizes["torch-static/fp32"] == fp32
    assert sizes["kvc-ort/int8"] == sizes["kvc-ort/fp8"] == 2 * 2 * 2 * (16 + 4)  # + one fp32 scale per vector


def test_torch_runners_report_their_engine_names():
    model = random_model(RANDOM_PRESETS["tiny"])
    assert TorchRunner(model, 1).engine is EngineName.TORCH_CONCAT
    assert TorchStaticRunner(model, 1, 16).engine is EngineName.TORCH_STATIC
