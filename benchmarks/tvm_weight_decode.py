"""Decode ms/token of several compiled artifacts, timed interleaved in one process (step by step,
round robin), so that their ratios hold on a loaded machine.

    python benchmarks/tvm_weight_decode.py before-fp32=a.kvc after-fp32=b.kvc after-int4=c.kvc \
        [--context 128] [--steps 32] [--reps 5] [--baseline before-fp32] [--batch 1] [--no-prefill]

Each artifact gets the same seeded prompt of --context tokens per row (a real prefill; --no-prefill skips it
and decodes from --context over the cache as loaded: a decode step's work follows the live length, not
the values, so deep contexts and KV dtypes compare without minutes of prefill), then --reps rounds; in
each round every artifact decodes --steps tokens (its own greedy continuation is not needed for
timing: a fixed token is fed). Reports the median ms/token per artifact, its ratio to --baseline, the
weight bytes it stores (TVM: params.safetensors; ORT: the graph's external data) and the GB/s those bytes
imply. Any engine's artifacts can be compared (e.g. TVM against ORT). Artifacts built by another kvc
version load with this one's runtime as long as their manifest format matches.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np

from kvc.contract import PARAMS_FILE
from kvc.runtime.model import LoadOptions, load


def stored_weight_bytes(artifact: Path) -> int:
    """Bytes of the artifact's weights: the TVM engine's params file, or the ORT engine's external data."""
    files = [artifact / PARAMS_FILE] if (artifact / PARAMS_FILE).exists() else list(artifact.glob("*.onnx.data"))
    return sum(f.stat().st_size for f in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="+", help="label=path of a compiled artifact")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--baseline", help="label the ratios are taken against (default: the first)")
    parser.add_argument("--batch", type=int, default=1, help="rows decoded together")
    parser.add_argument("--no-prefill", action="store_true", help="decode from --context without filling the cache")
    args = parser.parse_args()
    paths = dict(a.split("=", 1) for a in args.artifacts)
    baseline = args.baseline or next(iter(paths))
    models = {label: load(path, LoadOptions(max_batch=args.batch)) for label, path in paths.items()}
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, 1000, (args.batch, args.context))
    tokens = np.full(args.batch, 5)
    past = {}
    for label, model in models.items():
        if model.capacity < args.context + args.steps * (args.reps + 1):
            raise SystemExit(f"{label}: capacity {model.capacity} is below context + all decode steps; recompile")
        if not args.no_prefill:
            model.prefill(prompt)
        past[label] = args.context
    def steps(label: str) -> float:
        model, start = models[label], time.perf_counter()
        for _ in range(args.steps):
            model.decode(tokens, np.full(args.batch, past[label]))
            past[label] += 1
        return (time.perf_counter() - start) / args.steps
    for label in models:  # warm-up round
        steps(label)
    times: dict[str, list[float]] = {label: [] for label in models}
    for _ in range(args.reps):
        for label in models:
            times[label].append(steps(label))
    base = statistics.median(times[baseline])
    fill = "no prefill (cache as loaded)" if args.no_prefill else "after a real prefill"
    unit = "token" if args.batch == 1 else f"step of {args.batch} tokens"
    print(f"decode at context {args.context} ({fill}), batch {args.batch}, {args.steps} steps x {args.reps} "
          f"interleaved rounds, {len(os.sched_getaffinity(0))} CPUs; ratios vs {baseline}")
    for label, ts in times.items():
        med = statistics.median(ts)
        weights = stored_weight_bytes(Path(paths[label]))
        print(f"  {label:14s} median {med * 1e3:7.2f} ms/{unit}  min {min(ts) * 1e3:7.2f}  "
              f"vs {baseline} {med / base:5.3f}  params {weights / 1e6:6.1f} MB  "
              f"{weights / med / 1e9:5.1f} GB/s of stored weights")


if __name__ == "__main__":
    main()
