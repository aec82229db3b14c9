"""`kvc bench` through click: JSON output, and a one-line error for a bad --contexts list."""
from __future__ import annotations

import json

from click.testing import CliRunner

from kvc.cli.main import cli


def test_bench_writes_json(exported, tmp_path):
    _, _, onnx_path = exported("tiny")
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(cli, ["bench", str(onnx_path), "--contexts", "4,8", "--gen", "2", "--reps", "1",
                                      "--warmup", "0", "--engines", "ort-concat", "--bandwidth-gbs", "10",
                                      "--work-dir", str(tmp_path / "work"), "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert {(r["engine"], r["context"], r["metric"]) for r in data["rows"]} == {
        ("ort-concat", c, m) for c in (4, 8) for m in ("prefill_tok_s", "decode_ms_per_token")}
    assert data["header"]["machine"]["measured_bandwidth_bytes_per_s"] == 10e9
    assert "ort-concat" in result.stdout  # the table


def test_bad_contexts_is_a_one_line_error():
    result = CliRunner().invoke(cli, ["bench", "tiny", "--contexts", "12a"])
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--contexts" in lines[0] and "'12a'" in lines[0]


def test_unknown_engine_is_a_one_line_error():
    result = CliRunner().invoke(cli, ["bench", "tiny", "--engines", "torch,vllm"])
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "vllm" in lines[0] and "kvc-ort" in lines[0]


def test_bench_synthetic_fill_batch_and_capacities(exported, tmp_path):
    """--prefill synthetic (labelled in every row), --batch, --capacity with two values, --prefill-contexts."""
    _, _, onnx_path = exported("tiny")
    out, table_csv = tmp_path / "bench.json", tmp_path / "bench.csv"
    result = CliRunner().invoke(cli, ["bench", "tiny", "--contexts", "8,40", "--gen", "2", "--reps", "1",
                                      "--warmup", "0", "--engines", "kvc-ort,torch-static,torch", "--batch", "2",
                                      "--prefill", "synthetic", "--synthetic-tokens", "4", "--prefill-contexts", "8",
                                      "--prefill-reps", "1", "--capacity", "64,128", "--bandwidth-gbs", "10",
                                      "--work-dir", str(tmp_path / "work"), "--json", str(out), "--csv",
                                      str(table_csv)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    decode = [r for r in data["rows"] if r["metric"] == "decode_ms_per_token"]
    assert {(r["engine"], r["capacity"], r["context"]) for r in decode} == {
        (e, c, d) for e, c in (("kvc-ort", 64), ("kvc-ort", 128), ("torch-static", 64), ("torch-static", 128),
                               ("torch-concat", None)) for d in (8, 40)}
    assert all(r["fill"] == "synthetic" and r["batch"] == 2 and r["floor_ms"] > 0 for r in decode)
    prefill = [r for r in data["rows"] if r["metric"] == "prefill_tok_s"]
    assert {r["context"] for r in prefill} == {8} and all(r["fill"] == "real" for r in prefill)
    assert data["header"]["settings"]["fill"] == "synthetic" and "SYNTHETIC" in data["header"]["method"]
    assert "floor ms/step" in result.stdout and "capacity" in result.stdout


def test_capacity_below_the_deepest_context_is_a_one_line_error():
    result = CliRunner().invoke(cli, ["bench", "tiny", "--contexts", "128", "--gen", "8", "--capacity", "100"])
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--capacity 100" in lines[0]


def test_bad_prefill_mode_is_refused():
    result = CliRunner().invoke(cli, ["bench", "tiny", "--prefill", "fake"])
    assert result.exit_code != 0 and "synthetic" in result.output
