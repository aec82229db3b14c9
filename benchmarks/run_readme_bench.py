"""Regenerate the README's performance table and plot: `python benchmarks/run_readme_bench.py [--with-tvm]`.

Writes benchmarks/results/{bench.json,bench.csv,bench.png,table.md}. The model is the random-init
`llama-100m` preset (103M parameters, 413 MB of fp32 weights: far above any CPU's last-level cache,
so decode is a memory-bandwidth problem as with real checkpoints). Every engine runs the same
weights: PyTorch eager and ONNX Runtime on the concat export as baselines, and the kvc ONNX Runtime
engine with an fp32 and an int8 ring-buffer cache.

Sized for the project's 2-core machine (about 10 minutes on an otherwise idle one): contexts 128,
512 and 2048 (8192 would add an 8192-token prefill per engine, several minutes each on 2 cores),
32 timed decode steps per repetition, 1 warm-up and 5 timed decode repetitions, 2 timed prefills.
Run it on an idle machine: with other processes on the 2 cores, multi-threaded engines (torch
above all) slow down by large, erratic factors.

--with-tvm adds the kvc TVM engine (fp32 cache, built for this CPU) at the same contexts, timed
after the others in the same process against the same bandwidth measurement; its build takes
about a minute and its prefill (~140 tokens/s at 512 here) adds roughly 5-10 minutes.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from kvc.compiler.bench import BenchConfig, EngineName, run_bench
from kvc.compiler.bench.plot import write_plot
from kvc.compiler.bench.progress import progress_for
from kvc.compiler.bench.report import markdown_table, print_table, write_csv, write_json

PRESET = "llama-100m"
README_BENCH = BenchConfig(contexts=(128, 512, 2048), gen=32, kv_dtypes=("fp32", "int8"),
                           engines=(EngineName.TORCH, EngineName.ORT_CONCAT, EngineName.KVC_ORT),
                           batch=1, reps=5, warmup=1, prefill_reps=2)
TVM_BENCH = dataclasses.replace(README_BENCH, kv_dtypes=("fp32",), engines=(EngineName.KVC_TVM,))
RESULTS = Path(__file__).resolve().parent / "results"


def describe(result, seconds: float) -> str:
    machine, settings = result.header["machine"], result.header["settings"]
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    return (f"Model: {result.header['model']['description']}, "
            f"{result.header['model']['parameters'] / 1e6:.0f}M parameters (fp32 weights). "
            f"Machine: {machine['cpu']}, {machine['cpus_available']} CPU(s), {settings['threads']} thread(s), "
            f"{(machine['memory_bytes'] or 0) / 2**30:.0f} GiB; measured copy bandwidth "
            f"{machine['measured_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s. "
            f"Settings: batch {settings['batch']}, {settings['gen']} decode steps, {settings['warmup']} warm-up + "
            f"{settings['reps']} timed decode repetitions and {settings['prefill_reps']} timed prefills per "
            f"context (median, min-max). Versions: {versions}. Whole run {seconds / 60:.1f} min.\n\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the results go")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep the export and artifacts here and reuse them on the next run")
    parser.add_argument("--with-tvm", action="store_true", help="also time the kvc TVM engine (slow, see above)")
    args = parser.parse_args()
    start = time.perf_counter()
    progress = progress_for(sys.stderr)
    result = run_bench(PRESET, dataclasses.replace(README_BENCH, work_dir=args.work_dir), progress)
    if args.with_tvm:  # compared against the same bandwidth measurement
        bandwidth = result.header["machine"]["measured_bandwidth_bytes_per_s"]
        tvm = run_bench(PRESET, dataclasses.replace(TVM_BENCH, work_dir=args.work_dir), progress, bandwidth)
        result.rows += tvm.rows
        result.engines.update(tvm.engines)
    seconds = time.perf_counter() - start
    print_table(result)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(result, args.out / "bench.json")
    write_csv(result, args.out / "bench.csv")
    write_plot(result, args.out / "bench.png")
    (args.out / "table.md").write_text(describe(result, seconds) + markdown_table(result))
    print(f"wrote {args.out}/bench.json, bench.csv, bench.png, table.md in {seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
