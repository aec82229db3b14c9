"""kvc bench: byte accounting against the torch model's own parameters and the engine's own
buffers, the bandwidth probe, an end-to-end run on the tiny preset, and that every baseline
computes the same greedy tokens as the kvc engine (so the comparison is like for like).
No timing is asserted anywhere: speed never goes in tests."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from kvc.compiler.bench import BenchConfig, EngineName, run_bench
from kvc.compiler.bench.bandwidth import (Roofline, decode_bytes_per_step, kv_bytes_per_cached_token, mean_attended_tokens,
                                          measure_bandwidth, weight_bytes_per_token)
from kvc.compiler.bench.measure import fill, greedy_decode, random_prompt
from kvc.compiler.bench.options import FillMode, parse_engines, parse_int_list
from kvc.compiler.bench.results import DECODE, PREFILL
from kvc.compiler.bench.sources import plan_source
from kvc.errors import KvcError
from kvc.models import random_model
from kvc.models.presets import RANDOM_PRESETS

BANDWIDTH = 10e9  # bytes/s handed to run_bench so the 1 GiB probe runs only in its own test


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2", "tiny-gpt2"])
def test_weight_bytes_match_the_torch_parameters_a_step_reads(preset):
    config = RANDOM_PRESETS[preset]
    model = random_model(config)
    total = sum(p.numel() for p in model.parameters())  # a tied table is one parameter, counted once
    h = config.hidden_size
    only_one_row = 0 if config.tie_word_embeddings else (config.vocab_size - 1) * h
    if preset == "tiny-gpt2":
        only_one_row += (config.max_position_embeddings - 1) * h
    assert weight_bytes_per_token(config) == 4 * (total - only_one_row)


def test_kv_bytes_on_a_known_config():
    config = RANDOM_PRESETS["tiny"]  # 2 layers, 2 kv heads, head_dim 16
    assert kv_bytes_per_cached_token(config, "fp32", per_token_scales=False) == 2 * 2 * 2 * 16 * 4
    assert kv_bytes_per_cached_token(config, "fp16", per_token_scales=False) == 2 * 2 * 2 * 16 * 2
    assert kv_bytes_per_cached_token(config, "int8", per_token_scales=True) == 2 * 2 * 2 * (16 + 4)
    assert mean_attended_tokens(10, 4) == (11 + 12 + 13 + 14) / 4
    weights = weight_bytes_per_token(config)
    assert decode_bytes_per_step(config, "int8", 100, batch=2) == weights + 2 * 100 * 8 * 20
    assert decode_bytes_per_step(config, "fp8", 100, batch=1, per_token_scales=False) == weights + 100 * 8 * 16


def test_kv_bytes_match_the_engine_buffers(compiled):
    from kvc.runtime.model import LoadOptions, load

    config = RANDOM_PRESETS["tiny"]
    for dtype, scales in (("fp32", False), ("int8", True)):
        model = load(compiled("tiny", dtype), LoadOptions(max_batch=2))
        assert model.kv_bytes_per_token() == kv_bytes_per_cached_token(config, dtype, scales)


def test_bandwidth_probe_is_positive_and_finite():
    value = measure_bandwidth(nbytes=16 << 20, repeats=2, threads=2)
    assert math.isfinite(value) and value > 0


def test_torch_is_the_concat_baselines_old_name():
    assert parse_engines("torch,torch-static") == (EngineName.TORCH_CONCAT, EngineName.TORCH_STATIC)


def test_context_list_parsing():
    assert parse_int_list("512, 128,2k,128", "--contexts") == (128, 512, 2048)
    for bad in ("12a", "", "0", "-5", "1.5"):
        with pytest.raises(KvcError, match="--contexts"):
            parse_int_list(bad, "--contexts")


ALL_ENGINES = tuple(EngineName)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("bench-work")
    # One cache dtype keeps the TVM build (the slow part) to one; int8 is covered by the artifact test.
    config = BenchConfig(contexts=(8, 16), gen=4, reps=1, warmup=0, kv_dtypes=("fp32",),
                         engines=ALL_ENGINES, prefill_chunk=8, work_dir=work, synthetic_tokens=4)
    return run_bench("tiny", config, bandwidth=BANDWIDTH), work


def test_end_to_end_rows_for_every_engine(tiny_run):
    result, _ = tiny_run
    expected = {"torch-concat/fp32", "torch-static/fp32", "ort-concat/fp32", "kvc-ort/fp32", "kvc-tvm/fp32"}
    assert set(result.engines) == expected
    for label, status in result.engines.items():
        engine, dtype = label.split("/")
        rows = [r for r in result.rows if r.engine == engine and r.kv_dtype == dtype]
        if engine == "kvc-tvm" and status != "ok":  # the TVM engine may not build on this machine
            assert status.startswith("unavailable: ") and not rows
            continue
        assert status == "ok", label
        assert {(r.context, r.metric) for r in rows} == {(c, m) for c in (8, 16) for m in (PREFILL, DECODE)}
        for r in rows:
            assert all(math.isfinite(v) and v > 0 for v in (r.median, r.min, r.max)), r
            assert r.min <= r.median <= r.max and r.reps == 1
            if r.metric == DECODE:
                assert r.bytes_per_token > weight_bytes_per_token(RANDOM_PRESETS["tiny"])
                assert math.isfinite(r.bandwidth_fraction) and r.bandwidth_fraction > 0
                assert r.floor_ms == pytest.approx(1e3 * r.bytes_per_token / BANDWIDTH)
                assert r.bandwidth_fraction == pytest.approx(r.floor_ms / r.median)
                assert r.fill == "synthetic" and r.batch == 1
            else:
                assert r.fill == "real"
            assert r.capacity == (None if engine.endswith("concat") else 16 + 4)
    decode = {(r.engine, r.context): r.bytes_per_token for r in result.rows if r.metric == DECODE}
    assert decode[("kvc-ort", 16)] > decode[("kvc-ort", 8)] == decode[("torch-concat", 8)]  # same bytes, any engine
    assert decode[("torch-static", 8)] == decode[("torch-concat", 8)]


def test_end_to_end_writes_json_csv_png(tiny_run, tmp_path):
    from kvc.compiler.bench.plot import write_plot
    from kvc.compiler.bench.report import markdown_table, write_csv, write_json

    result, _ = tiny_run
    write_json(result, tmp_path / "b.json")
    write_csv(result, tmp_path / "b.csv")
    write_plot(result, tmp_path / "b.png")
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["header"]["machine"]["threads_used"] >= 1 and data["header"]["machine"]["cpu"]
    assert data["header"]["engines"] == result.engines
    assert len(data["rows"]) == len(result.rows)
    assert {"engine", "kv_dtype", "context", "metric", "median", "spread", "bytes_per_token",
            "bandwidth_fraction"} <= set(data["rows"][0])
    with open(tmp_path / "b.csv") as f:
        assert len(list(csv.DictReader(f))) == len(result.rows)
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = markdown_table(result)
    assert table.count("\n| ") == len(result.rows) // 2  # header + separator + one line per row pair


def _greedy(runner, prompt, steps):
    """Tokens and logits of greedy decoding after prefilling ``prompt`` in two chunks."""
    runner.rewind(0)
    logits = fill(runner, prompt, chunk=5)
    seen = [logits]
    tokens = []
    for _ in range(steps):
        tokens.append(np.argmax(logits, axis=-1))
        logits = runner.step(tokens[-1][:, None].astype(np.int64))
        seen.append(logits)
    return np.stack(tokens, 1), np.stack(seen, 1)


def test_baselines_compute_the_same_greedy_tokens_as_the_kvc_engine(tiny_run):
    result, work = tiny_run  # reuse the run's export and artifacts
    engines = (EngineName.KVC_ORT, EngineName.TORCH_CONCAT, EngineName.TORCH_STATIC, EngineName.ORT_CONCAT)
    if result.engines["kvc-tvm/fp32"] == "ok":  # its artifact is already built: compare it too
        engines += (EngineName.KVC_TVM,)
    config = BenchConfig(contexts=(8, 16), gen=4, batch=2, engines=engines, work_dir=work)
    target = plan_source("tiny", config, work)
    vocab = RANDOM_PRESETS["tiny"].vocab_size
    prompt = random_prompt(vocab, 2, 9, seed=7)
    results = {slot.engine: _greedy(slot.open(), prompt, 6) for slot in target.slots}
    ref_tokens, ref_logits = results[EngineName.KVC_ORT]
    assert ref_tokens.shape == (2, 6) and ref_logits.shape == (2, 7, vocab)
    for engine in engines[1:]:
        tokens, logits = results[engine]
        np.testing.assert_array_equal(tokens, ref_tokens, err_msg=engine.value)
        np.testing.assert_allclose(logits, ref_logits, rtol=1e-3, atol=1e-4, err_msg=engine.value)


@pytest.mark.parametrize("engine", [EngineName.KVC_ORT, EngineName.TORCH_CONCAT, EngineName.TORCH_STATIC,
                                    EngineName.ORT_CONCAT])
def test_rewind_repeats_the_same_decode(tiny_run, engine):
    """Repetitions rewind to depth d and decode again: that must reproduce the first pass."""
    _, work = tiny_run
    config = BenchConfig(contexts=(8, 16), gen=4, engines=(engine,), work_dir=work)
    runner = plan_source("tiny", config, work).slots[0].open()
    prompt = random_prompt(RANDOM_PRESETS["tiny"].vocab_size, 1, 10, seed=3)
    logits = fill(runner, prompt, chunk=4)
    first = greedy_decode(runner, logits, 5)
    runner.rewind(10)
    again = greedy_decode(runner, logits, 5)
    assert runner.length == 15
    np.testing.assert_array_equal(np.stack(first), np.stack(again))


def test_artifact_source_benches_only_its_engine(compiled):
    artifact = compiled("tiny", "int8")  # capacity 64
    config = BenchConfig(contexts=(8,), gen=4, reps=1, warmup=0)
    result = run_bench(str(artifact), config, bandwidth=BANDWIDTH)
    assert result.engines == {"kvc-ort/int8": "ok"}
    assert {(r.engine, r.kv_dtype) for r in result.rows} == {("kvc-ort", "int8")}
    decode = next(r for r in result.rows if r.metric == DECODE)
    assert decode.bytes_per_token == decode_bytes_per_step(RANDOM_PRESETS["tiny"], "int8", 8 + 2.5)
    with pytest.raises(KvcError, match="--max-seq-len"):
        run_bench(str(artifact), BenchConfig(contexts=(64,), gen=4), bandwidth=BANDWIDTH)


def test_onnx_source_reports_torch_unavailable(exported, tmp_path):
    _, _, onnx_path = exported("tiny")
    config = BenchConfig(contexts=(8,), gen=2, reps=1, warmup=0,
                         engines=(EngineName.TORCH_CONCAT, EngineName.TORCH_STATIC, EngineName.ORT_CONCAT),
                         work_dir=tmp_path)
    result = run_bench(str(onnx_path), config, bandwidth=BANDWIDTH)
    assert result.engines["torch-concat/fp32"].startswith("unavailable: ")
    assert result.engines["torch-static/fp32"].startswith("unavailable: ")
    assert result.engines["ort-concat/fp32"] == "ok"


@pytest.mark.parametrize("fill_mode", list(FillMode))
@pytest.mark.parametrize("prefill_reps", [0, 2])
@pytest.mark.parametrize("time_prefill", [True, False])
def test_measure_depth_sample_counts(prefill_reps, fill_mode, time_prefill):
    from kvc.compiler.bench.measure import DepthPlan, measure_depth, steps_per_depth
    from kvc.compiler.bench.runners import TorchRunner

    runner = TorchRunner(random_model(RANDOM_PRESETS["tiny"]), threads=1)
    steps = []
    plan = DepthPlan(gen=3, reps=2, warmup=1, chunk=4, prefill_reps=prefill_reps, fill=fill_mode,
                     time_prefill=time_prefill, synthetic_tokens=4)
    samples = measure_depth(runner, random_prompt(256, 1, 6, seed=1), plan, on_step=lambda: steps.append(1))
    expected_prefill = prefill_reps or (1 if fill_mode is FillMode.REAL else 0)
    assert len(samples.decode_step_s) == 2 and len(samples.prefill_s) == (expected_prefill if time_prefill else 0)
    assert len(steps) == steps_per_depth(plan) and runner.length == 0


def test_capacity_list_compiles_one_engine_per_capacity(tiny_run):
    _, work = tiny_run
    config = BenchConfig(contexts=(8,), gen=2, reps=1, warmup=0, prefill_reps=0, capacities=(16, 48),
                         engines=(EngineName.KVC_ORT, EngineName.TORCH_STATIC, EngineName.ORT_CONCAT), work_dir=work)
    result = run_bench("tiny", config, bandwidth=BANDWIDTH)
    assert set(result.engines) == {"kvc-ort/fp32/c16", "kvc-ort/fp32/c48", "torch-static/fp32/c16",
                                   "torch-static/fp32/c48", "ort-concat/fp32"}
    assert {(r.engine, r.capacity) for r in result.rows} == {
        ("kvc-ort", 16), ("kvc-ort", 48), ("torch-static", 16), ("torch-static", 48), ("ort-concat", None)}
    assert all(r.metric == DECODE for r in result.rows)  # synthetic fill, prefill_reps 0: no prefill timed
    from kvc.compiler.bench.report import markdown_table

    assert "| capacity |" in markdown_table(result)
    with pytest.raises(KvcError, match="--capacity 8"):
        BenchConfig(contexts=(8,), gen=2, capacities=(8, 64))


def test_batch_rows_count_every_rows_kv(tiny_run):
    _, work = tiny_run
    config = BenchConfig(contexts=(8,), gen=2, reps=1, warmup=0, prefill_reps=0, batch=3,
                         engines=(EngineName.KVC_ORT, EngineName.TORCH_STATIC), kv_dtypes=("int8",), work_dir=work)
    result = run_bench("tiny", config, bandwidth=BANDWIDTH)
    tiny = RANDOM_PRESETS["tiny"]
    by_engine = {r.engine: r for r in result.rows}
    attended = mean_attended_tokens(8, 2)
    assert by_engine["kvc-ort"].bytes_per_token == weight_bytes_per_token(tiny) + 3 * attended * 2 * 2 * 2 * (16 + 4)
    assert by_engine["torch-static"].bytes_per_token == weight_bytes_per_token(tiny) + 3 * attended * 2 * 2 * 2 * 16 * 4
    assert all(r.batch == 3 for r in result.rows)


def test_roofline_counts_weights_once_and_live_kv_per_row():
    roof = Roofline(weight_bytes=1000, kv_bytes_per_token=10, bandwidth=1e6)
    assert roof.bytes_per_step(50, batch=4) == 1000 + 4 * 50 * 10
    assert roof.floor_s(50, batch=4) == pytest.approx(3000 / 1e6)


def test_contexts_past_the_models_positions_are_timed_at_the_deepest_that_fits(tmp_path):
    config = BenchConfig(contexts=(8, 1020, 1024), gen=8, reps=1, warmup=0, prefill_reps=0,
                         engines=(EngineName.TORCH_STATIC,), work_dir=tmp_path)
    result = run_bench("tiny", config, bandwidth=BANDWIDTH)  # tiny has 1024 positions
    assert sorted(r.context for r in result.rows) == [8, 1016]
    assert result.header["settings"]["contexts_requested"] == [8, 1020, 1024]
    assert result.header["settings"]["contexts"] == [8, 1016]
