"""`kvc bench --weights`: rows per weight precision, with the roofline's bytes per step counting the
weights as stored (codes + one float32 scale per block of 32)."""
from __future__ import annotations

import pytest

from kvc.compiler.bench import BenchConfig, run_bench
from kvc.compiler.bench.bandwidth import stored_bytes_per_weight, weight_bytes_per_token
from kvc.compiler.bench.options import EngineName
from kvc.contract import WeightDtype
from kvc.models.presets import RANDOM_PRESETS

BANDWIDTH = 10e9


def test_stored_bytes_per_weight():
    assert stored_bytes_per_weight(WeightDtype.FP32) == 4
    assert stored_bytes_per_weight(WeightDtype.BF16) == 2
    assert stored_bytes_per_weight(WeightDtype.INT8, 32) == 1 + 4 / 32
    assert stored_bytes_per_weight(WeightDtype.INT4, 128) == 0.5 + 4 / 128
    tiny = RANDOM_PRESETS["tiny"]
    fp32 = weight_bytes_per_token(tiny)
    assert weight_bytes_per_token(tiny, weights=WeightDtype.INT4) == pytest.approx(fp32 * 0.625 / 4, abs=1)


def test_rows_per_weight_precision(tmp_path):
    config = BenchConfig(contexts=(8,), gen=2, reps=1, warmup=0, prefill_reps=0, threads=1, synthetic_tokens=4,
                         engines=(EngineName.KVC_ORT,), weights=(WeightDtype.FP32, WeightDtype.INT4),
                         work_dir=tmp_path)
    result = run_bench("tiny", config, bandwidth=BANDWIDTH)
    assert set(result.engines) == {"kvc-ort/fp32", "kvc-ort/fp32/w-int4"}
    assert all(status == "ok" for status in result.engines.values())
    rows = {r.engine: r for r in result.rows}
    assert set(rows) == {"kvc-ort", "kvc-ort w-int4"}
    saved = rows["kvc-ort"].bytes_per_token - rows["kvc-ort w-int4"].bytes_per_token
    tiny = RANDOM_PRESETS["tiny"]
    assert saved == pytest.approx(weight_bytes_per_token(tiny) - weight_bytes_per_token(tiny, weights=WeightDtype.INT4))
    assert any(p.name.endswith("-wint4.kvc") for p in tmp_path.rglob("*.kvc"))  # compiled --weights int4
