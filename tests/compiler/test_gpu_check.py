"""benchmarks/gpu_check.sh and its Python half, the parts that run without a GPU: arguments, the fast
one-line refusal without a GPU (no JSON written), the report's JSON (whole or nothing, the junit
summary), and the benchmark's bytes and bandwidth arithmetic. The check itself runs on a lent GPU."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _run(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), "--python", sys.executable, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_unknown_argument_and_missing_value_are_refused_in_one_line(tmp_path):
    for args, message in ((["--bogus"], "unknown argument '--bogus'"), (["--out"], "--out needs a value"),
                          (["--out", str(tmp_path / "no" / "x.json")], "does not exist")):
        result = _run(*args, cwd=tmp_path)
        assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
        assert message in result.stderr


def test_help_prints_the_usage(tmp_path):
    result = _run("--help", cwd=tmp_path)
    assert result.returncode == 0 and "usage: benchmarks/gpu_check.sh" in result.stdout


def test_without_a_gpu_it_refuses_fast_and_writes_nothing(tmp_path, gpu_check):
    if gpu_check.gpu_names():
        pytest.skip("a GPU is present: the check runs instead")
    start = time.perf_counter()
    result = _run("--out", str(tmp_path / "out.json"), cwd=tmp_path)
    assert result.returncode == gpu_check.NO_GPU_EXIT
    assert result.stderr.strip() == "gpu_check: no NVIDIA GPU here (libcuda reports none); run " \
                                    "benchmarks/gpu_check.sh on a machine with one"
    assert not list(tmp_path.iterdir())
    assert time.perf_counter() - start < 60  # before any test or export


def test_report_json_has_the_gpu_tests_and_bench(tmp_path, gpu_check):
    junit = tmp_path / "tests.xml"
    junit.write_text('<?xml version="1.0"?><testsuites><testsuite tests="4" failures="1" errors="0" skipped="1">'
                     '<testcase classname="tests.runtime.test_cuda_parity" name="test_a"/>'
                     '<testcase classname="tests.runtime.test_cuda_parity" name="test_b"><failure message="x"/>'
                     '</testcase><testcase classname="c" name="test_c"><skipped/></testcase>'
                     '<testcase classname="c" name="test_d"/></testsuite></testsuites>')
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"rows": [{"context": 512, "decode_ms_per_token": 1.5}]}))
    out = tmp_path / "gpu.json"
    gpu_check.main(["report", "--out", str(out), "--tests", str(junit), "--bench", str(bench)])
    payload = json.loads(out.read_text())
    assert payload["tests"] == {"ran": True, "tests": 4, "failures": 1, "errors": 0, "skipped": 1, "passed": 2,
                                "failed": ["tests.runtime.test_cuda_parity::test_b"]}
    assert payload["bench"]["rows"][0]["decode_ms_per_token"] == 1.5
    assert set(payload) >= {"gpu", "gpus", "host", "kvc_commit", "utc"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "gpu.json", "tests.xml"]  # no temp left
    gpu_check.main(["report", "--out", str(out)])  # tests that never ran are reported as such
    assert json.loads(out.read_text())["tests"] == {"ran": False} and json.loads(out.read_text())["bench"] is None


def test_write_json_is_whole_or_nothing(tmp_path, gpu_check):
    out = tmp_path / "x.json"
    out.write_text("old")
    with pytest.raises(TypeError):
        gpu_check.write_json(out, {"bad": object()})
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x.json"]
    with pytest.raises(SystemExit, match="does not exist"):
        gpu_check.write_json(tmp_path / "missing" / "x.json", {})


def test_bench_bytes_and_bandwidth(gpu_check):
    """llama-1b, bf16 weights: ~2.2 GB per step; KV (fp16, 22 layers x 4 heads x 64 x 2 x 2 B) per token."""
    config = gpu_check.bench_config([512, 8192, 32768], gen=32)
    assert config.max_position_embeddings >= 32768 + 32 and config.num_layers == 22
    kv_per_token = 2 * 22 * 4 * 64 * 2
    weights = gpu_check.decode_bytes(config, "fp16", 0)
    assert 2.0e9 < weights < 2.3e9
    assert gpu_check.decode_bytes(config, "fp16", 1000) - weights == pytest.approx(1000 * kv_per_token)
    row = gpu_check.row_for("ort", "fp16", 8192, 0.002, config, 32, copy_gbs=3000.0, nominal_gbs=3350.0)
    nbytes = gpu_check.decode_bytes(config, "fp16", 8192 + 33 / 2)
    assert row.decode_ms_per_token == pytest.approx(2.0)
    assert row.achieved_gbs == pytest.approx(nbytes / 0.002 / 1e9)
    assert row.pct_of_nominal == pytest.approx(100 * row.achieved_gbs / 3350)
    assert gpu_check.nominal_bandwidth("NVIDIA H100 80GB HBM3") == 3350
    assert gpu_check.nominal_bandwidth("Some other GPU") is None


def test_bench_arguments_are_checked_before_any_work(gpu_check, tmp_path):
    with pytest.raises(SystemExit, match="--contexts"):
        gpu_check.parse_contexts("512,lots")
    with pytest.raises(SystemExit, match="--engines"):
        gpu_check.main(["bench", "--out", str(tmp_path / "b.json"), "--engines", "trt"])
    with pytest.raises(SystemExit, match="does not exist"):
        gpu_check.main(["bench", "--out", str(tmp_path / "no" / "b.json")])


def test_bench_pipeline_runs_on_the_cpu_with_the_tiny_preset(gpu_check, tmp_path):
    """Export, bf16-weight compile and synthetic-fill decode timing, as on the GPU but on the CPU."""
    config = gpu_check.bench_config([16, 40], gen=4, preset="tiny")
    artifact = gpu_check.prepare_artifact(tmp_path, config, "ort", "int8", 40 + 4 + 64, progress=lambda *_: None)
    assert gpu_check.prepare_artifact(tmp_path, config, "ort", "int8", 108, progress=print) == artifact  # reused
    times = gpu_check.time_decode(artifact, "ort", "int8", [16, 40], gen=4, reps=1, device="cpu")
    assert sorted(times) == [16, 40] and all(0 < t < 5 for t in times.values())
