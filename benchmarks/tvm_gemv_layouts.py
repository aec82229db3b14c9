"""Decode GEMV y[n] = x[k] @ W: kvc's schedule on the exported W[k, n] layout vs a pre-packed
W[n / NB, k, NB] layout (each parallel block reads one contiguous slab), vs numpy (OpenBLAS).

    python benchmarks/tvm_gemv_layouts.py [--k 576] [--n 32000] [--reps 30]

All variants run interleaved in one process (rep by rep), next to a numpy copy-bandwidth
measurement, so the ratios hold on a loaded machine. Reports effective GB/s (weight bytes / time).
"""
from __future__ import annotations

import argparse
import os
import statistics

import numpy as np
import tvm
from tvm import s_tir, te, tirx

from kvc.compiler.tvm.schedules import CpuWeightMatmul
from kvc.compiler.tvm.schedules.cpu_matmul import MatmulTiles
from kvc.compiler.tvm.target import TargetSpec, host_cpu

from interleaved_timing import interleaved_times  # benchmarks/, the script's folder


def _i64(v: int):
    return tirx.IntImm("int64", v)


def row_major(k: int, n: int, target, cols: int = 64):
    x = te.placeholder((_i64(1), _i64(k)), "float32", name="x")
    w = te.placeholder((_i64(k), _i64(n)), "float32", name="w")
    r = te.reduce_axis((_i64(0), _i64(k)), "r")
    y = te.compute((_i64(1), _i64(n)), lambda i, j: te.sum(x[i, r] * w[r, j], axis=r), name="y")
    rule = CpuWeightMatmul(decode=MatmulTiles(rows=1, cols=cols, lanes=8))
    sch = rule.apply(te.create_prim_func([x, w, y]), target, False)
    return tvm.compile(sch.mod, target=target)


def packed(k: int, n: int, nb: int, target):
    """W packed [n / nb, k, nb]; parallel over n blocks, k outer, nb lanes accumulated in registers."""
    x = te.placeholder((_i64(1), _i64(k)), "float32", name="x")
    w = te.placeholder((_i64(n // nb), _i64(k), _i64(nb)), "float32", name="w")
    r = te.reduce_axis((_i64(0), _i64(k)), "r")
    y = te.compute((_i64(1), _i64(n)), lambda i, j: te.sum(x[i, r] * w[j // nb, r, j % nb], axis=r), name="y")
    sch = s_tir.Schedule(te.create_prim_func([x, w, y]))
    block = sch.get_sblock("y")
    i, j, kk = sch.get_loops(block)
    jo, ji = sch.split(j, [None, nb])
    sch.reorder(i, jo, kk, ji)
    work = sch.fuse(i, jo)
    sch.parallel(work)
    acc = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(acc, work)
    sch.vectorize(sch.get_loops(acc)[-1])
    vec, lanes = sch.split(ji, [None, 8])
    sch.unroll(vec)
    sch.vectorize(lanes)
    sch.decompose_reduction(block, kk)
    return tvm.compile(sch.mod, target=target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=576)
    parser.add_argument("--n", type=int, default=32000)
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    k, n = args.k, args.n
    target = TargetSpec(llvm_cpu=host_cpu(), num_cores=len(os.sched_getaffinity(0))).tvm_target()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, k), dtype=np.float32)
    w = rng.standard_normal((k, n), dtype=np.float32)
    want = x.astype(np.float64) @ w.astype(np.float64)
    tx, ty = tvm.runtime.tensor(x), tvm.runtime.tensor(np.zeros((1, n), np.float32))
    variants = {"numpy x @ W": lambda: x @ w}
    lib = row_major(k, n, target)
    tw = tvm.runtime.tensor(w)
    variants["kvc W[k,n] (NB 64)"] = lambda lib=lib, tw=tw: lib(tx, tw, ty)
    for cols in (128, 256, 512):
        wide = row_major(k, n, target, cols)
        variants[f"kvc W[k,n] NB {cols}"] = lambda wide=wide, tw=tw: wide(tx, tw, ty)
    for nb in (16, 32, 64):
        if n % nb:
            continue
        plib = packed(k, n, nb, target)
        wp = tvm.runtime.tensor(np.ascontiguousarray(w.reshape(k, n // nb, nb).transpose(1, 0, 2)))
        variants[f"packed [N/{nb},K,{nb}]"] = lambda plib=plib, wp=wp: plib(tx, wp, ty)
    for name, fn in variants.items():  # check each, warm up
        fn()
        got = fn() if name.startswith("numpy") else ty.numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3, err_msg=name)
    measured = interleaved_times(variants, args.reps)
    times, copy = measured.seconds, measured.copy_median
    print(f"K {k} N {n}: weights {w.nbytes / 1e6:.1f} MB; numpy copy bandwidth median {copy:.1f} GB/s "
          f"(max {max(measured.copy_gbs):.1f}); {args.reps} interleaved reps")
    base = statistics.median(times["kvc W[k,n] (NB 64)"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:22s} median {med * 1e3:7.3f} ms  min {min(ts) * 1e3:7.3f} ms  {w.nbytes / med / 1e9:6.1f} GB/s "
              f"({100 * w.nbytes / med / 1e9 / copy:5.1f}% of copy)  vs kvc {med / base:.3f}")


if __name__ == "__main__":
    main()
