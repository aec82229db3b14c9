"""Regenerate the README's performance table and plot: `python benchmarks/run_readme_bench.py [--peers-dir DIR]`.

One script, one process, one bandwidth measurement. Writes benchmarks/results/{bench.json,bench.csv,bench.png,
table.md}; table.md is what the README's Performance section pastes. The model is the seeded random-init
`llama-100m` preset (103M parameters, 413 MB of fp32 weights: far above any CPU's last-level cache, so decode is
a memory-bandwidth problem as with real checkpoints). Every engine runs the same weights:

  torch-concat    PyTorch eager, concat KV (torch.cat copies the cache every step)
  torch-static    PyTorch eager, static preallocated KV written in place (gpt-fast's scheme): the fair baseline
  ort-concat      ONNX Runtime on kvc's plain concat export (past fed back, copied every step)
  kvc-ort         kvc's ONNX Runtime engine, fp32 / int8 / fp8 ring-buffer cache
  kvc-tvm         kvc's TVM engine, same cache dtypes (--no-tvm leaves it out)
  ortgenai, llama.cpp   the peers, when --peers-dir points at what benchmarks/peers/setup.sh built

Decode: contexts 128, 512, 2048 and 8160 (the preset has 8192 positions; the 32 timed steps after 8160 attend
up to 8192 tokens) at batch 1 and batch 4, reached by a SYNTHETIC fill (the K/V of a real
64-token prefill tiled to the depth and written straight into each engine's cache; kvc bench --prefill synthetic),
so 8192 costs seconds; the peers prefill for real. Prefill (real) is timed at 128 and 512, batch 1. Every decode
row has the roofline: weights once + every row's live KV in its stored dtype (scales included) over the copy
bandwidth measured at the start, and the share of that bandwidth reached.

Duration on the project's 2-core machine: 76.6 min with peers, measured 2026-11-29 (llama.cpp's batch-4 runs
prefill 4 x 8160 tokens for real: ~15 min of it); estimated 35-50 min without
peers (kvc compiles at capacity 8192 once for both batches, ~1 min each for ORT and 2-4 min each for TVM; a
batch-4 step at 8160 moves ~1.6 GB (fp32 KV), the concat baselines copy that cache every step), plus 15-20 min
with peers (ORT-GenAI and llama.cpp prefill every depth for real, batch 4 x 8160 included). --quick runs a
2-context smoke version (128, 512; 8 steps, 1 repetition; 21 min with --no-tvm and ORT-GenAI on a machine at load
average 14, a few minutes when idle). Run it on an idle machine: with other processes on the 2 cores,
multi-threaded engines slow down by large, erratic factors.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

from kvc.compiler.bench import BenchConfig, EngineName, run_bench
from kvc.compiler.bench.bandwidth import measure_bandwidth
from kvc.compiler.bench.machine import bandwidth_probe_text
from kvc.compiler.bench.options import FillMode
from kvc.compiler.bench.plot import write_plot
from kvc.compiler.bench.progress import progress_for
from kvc.compiler.bench.report import markdown_table, write_csv, write_json
from kvc.compiler.bench.results import DECODE, Row
from kvc.compiler.bench.run import BenchResult

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))

PRESET = "llama-100m"
BATCHES = (1, 4)
# llama-100m has 8192 positions: the deepest depth leaves room for the 32 timed steps, which attend 8161..8192.
DEEPEST = 8192 - 32
README_BENCH = BenchConfig(contexts=(128, 512, 2048, DEEPEST), gen=32, kv_dtypes=("fp32", "int8", "fp8"),
                           engines=(EngineName.TORCH_CONCAT, EngineName.TORCH_STATIC, EngineName.ORT_CONCAT,
                                    EngineName.KVC_ORT, EngineName.KVC_TVM),
                           batch=1, reps=5, warmup=1, prefill_reps=2, fill=FillMode.SYNTHETIC,
                           prefill_contexts=(128, 512))
QUICK = dict(contexts=(128, 512), gen=8, reps=1, warmup=0, prefill_reps=1, prefill_contexts=(128,))
KVC_ENGINES = ("kvc-ort", "kvc-tvm")
RESULTS = Path(__file__).resolve().parent / "results"


def config_for(base: BenchConfig, batch: int, work_dir: Path) -> BenchConfig:
    """Batch > 1 times decode only: prefill tok/s is a batch-1 number."""
    return dataclasses.replace(base, batch=batch, work_dir=work_dir,
                               prefill_reps=base.prefill_reps if batch == 1 else 0)


def run_batch(preset: str, base: BenchConfig, batch: int, work_dir: Path, bandwidth: float, probe: str,
              peers_dir: Path | None) -> dict:
    """One kvc bench run at ``batch`` (plus the peers' rows), as a JSON document."""
    result = run_bench(preset, config_for(base, batch, work_dir), progress_for(sys.stderr), bandwidth, probe)
    doc = result.to_dict()
    if peers_dir is not None:
        from run import add_peers, PeerLayout

        layout = PeerLayout(peers_dir.expanduser(), preset)
        doc = add_peers(doc, layout, ("ortgenai", "llama.cpp"), ("f16", "q8_0"), flash=True, timeout=3600)
    return doc


def machine_bandwidth(threads: int, given_gbs: float | None) -> tuple[float, str]:
    """Bytes/s every row is compared with, and how it was obtained."""
    if given_gbs is not None:
        return given_gbs * 1e9, "given by the caller (--bandwidth-gbs), not measured"
    return measure_bandwidth(threads=threads), bandwidth_probe_text(threads) + ", measured once at the start"


def combine(docs: dict[int, dict]) -> BenchResult:
    """All batches in one result; engine statuses keyed "label @ batch N"."""
    first = docs[min(docs)]
    header = {k: v for k, v in first["header"].items() if k != "engines"}
    header["settings"] = {**header["settings"], "batch": list(docs)}
    rows, engines = [], {}
    for batch, doc in docs.items():
        rows += [Row.from_dict(r) for r in doc["rows"]]
        engines.update({f"{label} @ batch {batch}": status for label, status in doc["header"]["engines"].items()})
    return BenchResult(header, rows, engines)


def describe(result: BenchResult, seconds: float) -> str:
    machine, settings = result.header["machine"], result.header["settings"]
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    model = result.header["model"]
    return (f"Model: {model['description']}, {model['parameters'] / 1e6:.0f}M parameters (fp32 weights, "
            f"{model['weight_bytes_read_per_token'] / 1e6:.0f} MB read per step). "
            f"Machine: {machine['cpu']}, {machine['cpus_available']} CPU(s), {settings['threads']} thread(s) for "
            f"every engine, {(machine['memory_bytes'] or 0) / 2**30:.0f} GiB; measured copy bandwidth "
            f"{machine['measured_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s ({machine['bandwidth_probe']}). "
            f"Decode: batch {' and '.join(map(str, settings['batch']))}, {settings['gen']} greedy steps per "
            f"repetition, {settings['warmup']} warm-up + {settings['reps']} timed repetitions (median, min-max), "
            f"kvc engines and torch-static compiled for {settings['capacities'][0]} slots; cache filled "
            f"synthetically to each depth (\"decode fill\" column; peers prefill for real). Prefill: real, "
            f"{settings['prefill_reps']} timed runs at batch 1. Floor = bytes per step / measured bandwidth. "
            f"Versions: {versions}. Whole run {seconds / 60:.1f} min.\n")


def best(rows: list[Row], engines: tuple[str, ...] | None, batch: int, context: int,
         exclude: tuple[str, ...] = ()) -> Row | None:
    pool = [r for r in rows if r.metric == DECODE and r.batch == batch and r.context == context
            and (engines is None or r.engine in engines) and r.engine not in exclude]
    return min(pool, key=lambda r: r.median, default=None)


def comparison(result: BenchResult) -> str:
    """Per batch and context: kvc's best engine against the best of everything else (peers included)."""
    lines = ["| batch | context | kvc best (ms/step) | best other (ms/step) | kvc speed-up |", "|---|---|---|---|---|"]
    for batch in sorted({r.batch for r in result.rows}):
        for context in sorted({r.context for r in result.rows if r.batch == batch}):
            ours = best(result.rows, KVC_ENGINES, batch, context)
            other = best(result.rows, None, batch, context, exclude=KVC_ENGINES)
            if ours is None or other is None:
                continue
            lines.append(f"| {batch} | {context} | {ours.engine} {ours.kv_dtype} {ours.median:.2f} | "
                         f"{other.engine} {other.kv_dtype} {other.median:.2f} | {other.median / ours.median:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the results go")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep the export and artifacts here and reuse them on the next run")
    parser.add_argument("--peers-dir", type=Path, default=None, help="add ORT-GenAI and llama.cpp (setup.sh's folder)")
    parser.add_argument("--no-tvm", action="store_true", help="leave the kvc TVM engine out (its builds are slow)")
    parser.add_argument("--quick", action="store_true", help="a small smoke version (see above)")
    parser.add_argument("--bandwidth-gbs", type=float, default=None, help="skip the probe (GB/s to compare with)")
    parser.add_argument("--preset", default=PRESET, help=argparse.SUPPRESS)  # tests run the script on `tiny`
    args = parser.parse_args()
    base = dataclasses.replace(README_BENCH, **(QUICK if args.quick else {}))
    if args.no_tvm:
        base = dataclasses.replace(base, engines=tuple(e for e in base.engines if e is not EngineName.KVC_TVM))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kvc-readme-") as tmp:
        work = args.work_dir or Path(tmp)
        bandwidth, probe = machine_bandwidth(base.resolved_threads(), args.bandwidth_gbs)
        docs = {b: run_batch(args.preset, base, b, work, bandwidth, probe, args.peers_dir) for b in BATCHES}
    seconds = time.perf_counter() - start
    result = combine(docs)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(result, args.out / "bench.json")
    write_csv(result, args.out / "bench.csv")
    write_plot(result, args.out / "bench.png")
    (args.out / "table.md").write_text(describe(result, seconds) + "\n" + markdown_table(result) + "\n"
                                       + comparison(result))
    print((args.out / "table.md").read_text())
    print(f"wrote {args.out}/bench.json, bench.csv, bench.png, table.md in {seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
