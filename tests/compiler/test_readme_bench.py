"""benchmarks/run_readme_bench.py end to end on the tiny preset (--quick): both batches, every engine
but TVM, the roofline columns, the peers reported unavailable when not built. No timing asserted."""
from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "run_readme_bench.py"


def test_readme_bench_quick_on_tiny(tmp_path, monkeypatch):
    out = tmp_path / "results"
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--preset", "tiny", "--quick", "--no-tvm", "--bandwidth-gbs", "10",
                                      "--out", str(out), "--work-dir", str(tmp_path / "work"),
                                      "--peers-dir", str(tmp_path / "no-peers")])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    doc = json.loads((out / "bench.json").read_text())
    decode = [r for r in doc["rows"] if r["metric"] == "decode_ms_per_token"]
    assert {(r["batch"], r["context"]) for r in decode} == {(b, c) for b in (1, 4) for c in (128, 512)}
    assert {r["engine"] for r in decode} == {"torch-concat", "torch-static", "ort-concat", "kvc-ort"}
    assert {r["kv_dtype"] for r in decode if r["engine"] == "kvc-ort"} == {"fp32", "int8", "fp8"}
    assert all(r["fill"] == "synthetic" and r["floor_ms"] > 0 for r in decode)
    prefill = [r for r in doc["rows"] if r["metric"] == "prefill_tok_s"]
    assert {(r["batch"], r["context"]) for r in prefill} == {(1, 128)}
    engines = doc["header"]["engines"]
    assert engines["ortgenai/fp32 @ batch 4"].startswith("unavailable: ")
    table = (out / "table.md").read_text()
    assert "floor ms/step (roofline)" in table and "measured copy bandwidth 10.0 GB/s" in table
    assert "| 4 | 512 | kvc-ort" in table  # the kvc-vs-best-other comparison
    assert (out / "bench.png").stat().st_size > 0 and (out / "bench.csv").is_file()
