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
