"""benchmarks/tvm_decode_attention.py, tvm_weight_decode.py and tvm_packed_gemv.py at toy sizes: each checks its
kernels or artifacts against a reference before timing them (the attention script against float64 numpy), so a broken
kernel or an option that no longer loads fails here. No timing asserted."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _run(monkeypatch, script: str, *args: str) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import interleaved_timing beside them
    monkeypatch.setattr(sys, "argv", [str(BENCHMARKS / script), *args])
    runpy.run_path(str(BENCHMARKS / script), run_name="__main__")


def test_decode_attention_benchmark_checks_every_cache_dtype(monkeypatch, capsys):
    # head size 32: int8 takes the integer dot products on AVX-512 BW machines, int8-float the float path
    _run(monkeypatch, "tvm_decode_attention.py", "--heads", "4", "--kv-heads", "2", "--head-dim", "32",
         "--batch", "2", "--context", "70", "--capacity", "96", "--reps", "1")
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert rows == ["fp32", "fp16", "int8", "int8-float", "fp8"]


def test_interleaved_decode_benchmark_runs_batched_without_prefill(monkeypatch, capsys, compiled):
    # capacity 96: the artifacts test_tvm_engine.py builds (compiled once per session)
    artifacts = [f"{kv}={compiled('tiny', kv_dtype=kv, capacity=96, engine='tvm')}" for kv in ("fp32", "fp8")]
    _run(monkeypatch, "tvm_weight_decode.py", *artifacts, "--batch", "2", "--no-prefill", "--context", "40",
         "--steps", "2", "--reps", "2")
    out = capsys.readouterr().out
    assert "batch 2" in out and "no prefill" in out
    assert [line.split()[0] for line in out.splitlines() if line.startswith("  ")] == ["fp32", "fp8"]


def test_packed_gemv_benchmark_checks_a_symbolic_batch(monkeypatch, capsys):
    _run(monkeypatch, "tvm_packed_gemv.py", "--k", "64", "--n", "256", "--rows", "3", "--reps", "1")
    out = capsys.readouterr().out
    assert "3 row(s)" in out and "packed fp32, 1 row" in out
