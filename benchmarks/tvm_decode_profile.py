"""Decode step time of kvc artifacts side by side, plus a per-kernel profile of the TVM decode step.

    python benchmarks/tvm_decode_profile.py ART [ART ...] [--contexts 128 512 2048] [--steps 20]
                                            [--profile] [--batch 1]

Each artifact (TVM or ORT engine) is loaded once and timed alone (engines one after the other,
never interleaved). Deep contexts are measured without prefill: the cache holds zeros and
past_len says `ctx` slots are live (decode's work depends on the live length, not on the values).
Prints median and min ms/token, and the numpy copy bandwidth measured in the same run, so rows
are compared as same-run ratios on a shared machine. --profile adds the Relax VM profiler's
per-kernel table for the TVM decode step (min over repeats, grouped by kernel).
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import numpy as np


def copy_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """GB/s of numpy copy (read + write counted), best of ``repeats``."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return 2 * nbytes / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_times(model, ctx: int, steps: int, batch: int) -> list[float]:
    """Seconds per decode step at live context ``ctx``."""
    tokens = np.ones((batch, 1), np.int64)
    past = np.full((batch,), ctx, np.int64)
    for _ in range(3):
        model.decode(tokens, past)
    return [_timed(lambda: model.decode(tokens, past)) for _ in range(steps)]


def profile_decode(model, ctx: int, batch: int = 1, repeats: int = 5) -> None:
    """Per-kernel time of one TVM decode step (decode_b1 at batch 1, else the batched decode entry), min over
    ``repeats`` per call site (the VM's instrument hook around each packed call; VM builtins such as
    allocations included)."""
    import tvm
    from tvm import relax

    engine = model.engine
    vm = relax.VirtualMachine(tvm.runtime.load_module(engine.root_lib), engine.device)
    dev = engine.device
    entry = "decode_b1" if batch == 1 else "decode"
    args = [tvm.runtime.tensor(np.ones((batch, 1), np.int64), dev),
            tvm.runtime.tensor(np.full((batch, 1), ctx, np.int64), dev),
            tvm.runtime.tensor(np.full((batch,), ctx, np.int64), dev), *engine._views(batch),
            *engine.entry_params[entry]]
    calls: list[list] = []  # per repeat: (name, seconds) in call order
    started: list[float] = []

    def instrument(func, name, before_run, ret_value, *call_args):
        if before_run:
            started.append(time.perf_counter())
        else:
            calls[-1].append((str(name), time.perf_counter() - started.pop()))
        return 0  # NO_OP: keep running

    vm.set_instrument(instrument)
    for _ in range(repeats + 1):
        calls.append([])
        vm[entry](*args)
    plain = relax.VirtualMachine(tvm.runtime.load_module(engine.root_lib), dev)
    step = min(_timed(lambda: plain[entry](*args)) for _ in range(repeats))
    best: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for site in range(len(calls[1])):  # the first run warms up
        name = calls[1][site][0]
        best[name] += min(run[site][1] for run in calls[1:])
        counts[name] += 1
    total = sum(best.values())
    print(f"  profile {entry} batch {batch} ctx {ctx}: step {step * 1e3:.2f} ms uninstrumented; "
          f"kernels {total * 1e3:.2f} ms in {sum(counts.values())} calls ({len(counts)} kinds)")
    for name, sec in sorted(best.items(), key=lambda kv: -kv[1])[:25]:
        print(f"    {sec * 1e3:7.3f} ms {100 * sec / total:5.1f}%  x{counts[name]:<4d} {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="+")
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    from kvc.runtime.model import LoadOptions, load

    print(f"numpy copy bandwidth: {copy_bandwidth():.1f} GB/s")
    rows = {}
    for path in args.artifacts:
        model = load(path, LoadOptions(max_batch=args.batch, threads=args.threads))
        label = f"{model.manifest.engine}/{model.manifest.cache.dtype} cap {model.capacity}"
        if model.manifest.engine == "tvm":
            from pathlib import Path
            model.engine.root_lib = str(next(Path(path, "lib").glob("*.so")))  # lib/<target>.so
        for ctx in args.contexts:
            if ctx >= model.capacity:
                continue
            times = step_times(model, ctx, args.steps, args.batch)
            rows[(label, ctx)] = (statistics.median(times), min(times))
            print(f"{label:28s} ctx {ctx:5d}: median {1e3 * rows[(label, ctx)][0]:7.2f}  "
                  f"min {1e3 * rows[(label, ctx)][1]:7.2f} ms/token", flush=True)
        if args.profile and model.manifest.engine == "tvm":
            for ctx in args.contexts:
                if ctx < model.capacity:
                    profile_decode(model, ctx, args.batch)
        del model
    labels = list(dict.fromkeys(label for label, _ in rows))
    if len(labels) > 1:
        base = labels[-1]
        for label in labels[:-1]:
            for ctx in args.contexts:
                if (label, ctx) in rows and (base, ctx) in rows:
                    print(f"ratio {label} / {base} ctx {ctx}: median "
                          f"{rows[(label, ctx)][0] / rows[(base, ctx)][0]:.3f}  min "
                          f"{rows[(label, ctx)][1] / rows[(base, ctx)][1]:.3f}")


if __name__ == "__main__":
    main()
