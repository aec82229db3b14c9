"""The Python half of benchmarks/gpu_check.sh: refuse early without a GPU, time decode on CUDA, write the JSON.

  preflight              exit 3 with one line when there is no usable NVIDIA GPU, ONNX Runtime CUDA EP or
                         TVM CUDA runtime (before minutes of work); prints the GPU's name otherwise
  bench --out FILE       decode ms/token at each --contexts depth on the llama-1b preset (22 layers, hidden
                         2048, 4 kv heads) with bf16 weights, its positions extended to the deepest context;
                         the cache brought to depth by a synthetic fill (a 64-token prefill's K/V tiled, as
                         `kvc bench --prefill synthetic`); bytes per step = stored weights + live KV; % of HBM
                         against the GPU's measured device-to-device copy bandwidth and its nominal peak
  report --out FILE      one JSON: GPU, the GPU-marked tests (pytest's junit XML), the benchmark

The file is written whole or not at all (a temporary file renamed into place).
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

NO_GPU_EXIT = 3
PRESET = "llama-1b"
WEIGHTS = "bf16"
# Nominal HBM bandwidth (GB/s) by the name nvidia-smi prints; the measured copy bandwidth is reported too.
NOMINAL_GBS = {"H100 80GB HBM3": 3350, "H100 SXM": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "H200": 4800,
               "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935, "A100-SXM4-40GB": 1555, "L40S": 864, "L4": 300}


def gpu_names() -> list[str]:
    """Names of the NVIDIA GPUs the driver reports ([] without a driver or GPU)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return []
    count = ctypes.c_int(0)
    if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return []
    names = []
    for index in range(count.value):
        device, name = ctypes.c_int(0), ctypes.create_string_buffer(256)
        lib.cuDeviceGet(ctypes.byref(device), index)
        lib.cuDeviceGetName(name, 256, device)
        names.append(name.value.decode(errors="replace"))
    return names


def nominal_bandwidth(name: str) -> float | None:
    return next((float(v) for k, v in NOMINAL_GBS.items() if k in name), None)


def preflight_problem() -> str | None:
    """What stops the GPU check on this machine, as one line, or None."""
    if not gpu_names():
        return "no NVIDIA GPU here (libcuda reports none); run benchmarks/gpu_check.sh on a machine with one"
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "this onnxruntime has no CUDAExecutionProvider; pip install onnxruntime-gpu"
    import tvm

    if not tvm.cuda(0).exist or tvm.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is None:
        return "TVM finds no CUDA runtime or device; install a CUDA-enabled apache-tvm"
    return None


# --- benchmark ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BenchRow:
    engine: str
    kv_dtype: str
    context: int
    decode_ms_per_token: float
    bytes_per_step: float
    achieved_gbs: float
    pct_of_measured_copy: float
    pct_of_nominal: float | None


def decode_bytes(config, kv_dtype: str, attended_tokens: float) -> float:
    """Stored bf16 weights read once per step plus the live KV (scales included) one row attends."""
    from kvc.compiler.bench.bandwidth import has_per_token_scales, kv_bytes_per_cached_token, weight_bytes_per_token
    from kvc.contract import WeightDtype

    return (weight_bytes_per_token(config, weights=WeightDtype(WEIGHTS))
            + attended_tokens * kv_bytes_per_cached_token(config, kv_dtype, has_per_token_scales(kv_dtype)))


def row_for(engine: str, kv_dtype: str, context: int, step_s: float, config, gen: int, copy_gbs: float,
            nominal_gbs: float | None) -> BenchRow:
    from kvc.compiler.bench.bandwidth import mean_attended_tokens

    nbytes = decode_bytes(config, kv_dtype, mean_attended_tokens(context, gen))
    achieved = nbytes / step_s / 1e9
    return BenchRow(engine, kv_dtype, context, step_s * 1e3, nbytes, achieved, 100 * achieved / copy_gbs,
                    None if nominal_gbs is None else 100 * achieved / nominal_gbs)


def device_copy_gbs(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Device-to-device copy bandwidth (read + write bytes / s) of one ONNX Runtime CUDA Identity."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "copy",
                              [helper.make_tensor_value_info("x", TensorProto.UINT8, ["n"])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, ["n"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    session = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
    src = ort.OrtValue.ortvalue_from_shape_and_type([nbytes], np.uint8, "cuda", 0)
    dst = ort.OrtValue.ortvalue_from_shape_and_type([nbytes], np.uint8, "cuda", 0)
    binding = session.io_binding()
    binding.bind_ortvalue_input("x", src)
    binding.bind_ortvalue_output("y", dst)
    session.run_with_iobinding(binding)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        session.run_with_iobinding(binding)  # synchronous: ONNX Runtime waits for its stream
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best / 1e9


def bench_config(contexts: list[int], gen: int, preset: str = PRESET):
    """``preset`` (llama-1b) with positions for the deepest context plus the timed steps."""
    from kvc.models.presets import RANDOM_PRESETS

    base = RANDOM_PRESETS[preset]
    positions = max(base.max_position_embeddings, max(contexts) + gen + 64)
    return dataclasses.replace(base, max_position_embeddings=positions, name=f"{preset}-{positions}")


def prepare_artifact(work: Path, config, engine: str, kv_dtype: str, capacity: int, progress) -> Path:
    """Export the random-init model once and compile it (reused when already in ``work``)."""
    from kvc.compiler.options import CompileOptions, Device, EngineKind
    from kvc.compiler.pipeline import compile_model
    from kvc.models import random_model
    from kvc.models.export import export_onnx

    onnx_path = work / f"{config.name}.onnx"
    if not onnx_path.exists():
        progress(f"exporting {config.name}")
        export_onnx(random_model(config, seed=0), config, onnx_path)
    out = work / f"{config.name}-{engine}-{kv_dtype}-{capacity}.kvc"
    if not out.exists():
        progress(f"compiling {out.name}")
        device = Device.CUDA if engine == "tvm" else Device.CPU  # an ORT artifact runs on any device
        compile_model(onnx_path, out, CompileOptions(engine=EngineKind(engine), device=device, max_seq_len=capacity,
                                                     kv_dtype=kv_dtype, weights=WEIGHTS, check=False),
                      progress=progress)
    return out


def time_decode(artifact: Path, engine: str, kv_dtype: str, contexts: list[int], gen: int, reps: int,
                device: str = "cuda") -> dict:
    """context -> median seconds per decode step on ``device`` (the check: CUDA; tests: the CPU), batch 1."""
    import statistics

    from kvc.compiler.bench.measure import DepthPlan, measure_depth, random_prompt
    from kvc.compiler.bench.options import FillMode
    from kvc.compiler.bench.runners import KvcRunner
    from kvc.runtime import load

    model = load(artifact, device=device)
    runner = KvcRunner(model, engine, kv_dtype)
    plan = DepthPlan(gen=gen, reps=reps, warmup=1, chunk=512, prefill_reps=0, fill=FillMode.SYNTHETIC,
                     time_prefill=False)
    out = {}
    for context in contexts:
        prompt = random_prompt(model.engine.vocab_size, 1, context, seed=0)
        out[context] = statistics.median(measure_depth(runner, prompt, plan).decode_step_s)
    return out


def run_bench(args, progress=print) -> dict:
    contexts = parse_contexts(args.contexts)
    config = bench_config(contexts, args.gen)
    name = (gpu_names() or ["unknown"])[0]
    copy_gbs = device_copy_gbs()
    nominal = nominal_bandwidth(name)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for engine in args.engines.split(","):
        artifact = prepare_artifact(work, config, engine, args.kv_dtype, max(contexts) + args.gen + 64, progress)
        for context, step_s in time_decode(artifact, engine, args.kv_dtype, contexts, args.gen, args.reps).items():
            rows.append(row_for(engine, args.kv_dtype, context, step_s, config, args.gen, copy_gbs, nominal))
            progress(f"{engine} {args.kv_dtype} ctx {context}: {step_s * 1e3:.2f} ms/token")
    return {"model": {"preset": PRESET, "parameters": config.num_parameters(), "weights": WEIGHTS,
                      "max_positions": config.max_position_embeddings},
            "batch": 1, "gen": args.gen, "reps": args.reps, "fill": "synthetic",
            "device_copy_gbs": copy_gbs, "nominal_gbs": nominal, "rows": [dataclasses.asdict(r) for r in rows]}


def parse_contexts(text: str) -> list[int]:
    try:
        contexts = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        contexts = []
    if not contexts or min(contexts) < 1:
        raise SystemExit(f"gpu_check: --contexts must be positive integers separated by commas, got {text!r}")
    return contexts


# --- report ---------------------------------------------------------------------------------------

def junit_summary(path: Path | None) -> dict:
    """Counts and failing test ids from pytest's --junitxml file (missing: the tests did not run)."""
    if path is None or not path.exists():
        return {"ran": False}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {"ran": True, **counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": failed}


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` whole or not at all (a temporary file in the same directory, then renamed)."""
    if not path.parent.is_dir():
        raise SystemExit(f"gpu_check: the directory of --out {path} does not exist; create it or choose another")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def report(args) -> dict:
    bench = json.loads(Path(args.bench).read_text()) if args.bench and Path(args.bench).exists() else None
    names = gpu_names()
    payload = {"gpu": names[0] if names else None, "gpus": names, "host": platform.node(),
               "tests": junit_summary(Path(args.tests) if args.tests else None), "bench": bench,
               "kvc_commit": _git_commit(), "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_json(Path(args.out), payload)
    return payload


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check.py")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("preflight")
    bench = sub.add_parser("bench")
    bench.add_argument("--out", required=True)
    bench.add_argument("--contexts", default="512,8192,32768")
    bench.add_argument("--engines", default="ort", help="comma-separated: ort,tvm (tvm compiles a 1B model: minutes)")
    bench.add_argument("--kv-dtype", default="fp16")
    bench.add_argument("--gen", type=int, default=32)
    bench.add_argument("--reps", type=int, default=3)
    bench.add_argument("--work-dir", default="gpu_check_work")
    rep = sub.add_parser("report")
    rep.add_argument("--out", required=True)
    rep.add_argument("--tests")
    rep.add_argument("--bench")
    args = parser.parse_args(argv)
    if args.command == "preflight":
        problem = preflight_problem()
        if problem:
            print(f"gpu_check: {problem}", file=sys.stderr)
            return NO_GPU_EXIT
        print(gpu_names()[0])
        return 0
    if args.command == "bench":
        if any(e not in ("ort", "tvm") for e in args.engines.split(",")):
            raise SystemExit(f"gpu_check: --engines takes ort and/or tvm, got {args.engines!r}")
        parse_contexts(args.contexts)
        if not Path(args.out).parent.is_dir():
            raise SystemExit(f"gpu_check: the directory of --out {args.out} does not exist; create it or choose another")
        write_json(Path(args.out), run_bench(args, progress=lambda m: print(f"gpu_check: {m}", file=sys.stderr)))
        return 0
    report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
