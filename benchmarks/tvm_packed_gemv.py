"""Decode GEMV y = x @ W as the TVM engine builds it: the ai.kvc PackedMatMul kernel (fp32, int8, int4 weights,
kvc.compiler.tvm.converters.packed_matmul under kvc.compiler.tvm.schedules.cpu_packed_matmul) against the
old path (fp32 W [K, N] under CpuWeightMatmul) and numpy (OpenBLAS) on the fp32 W.

    python benchmarks/tvm_packed_gemv.py [--k 576] [--n 32000] [--block 32] [--reps 30] [--rows 1]

All variants run interleaved in one process, rep by rep, next to a numpy copy-bandwidth measurement, so
the ratios hold on a loaded machine. GB/s counts the bytes each variant stores (codes + scales).
--rows R > 1 times a batched decode step: the packed kernels are built for a symbolic batch, as the TVM
engine's batched decode is, and called with R rows; "packed fp32, 1 row" is the same kernel on one row.
"""
from __future__ import annotations

import argparse
import os
import statistics

import numpy as np
import tvm
from tvm import te, tirx

from kvc.compiler.tvm.converters.packed_matmul import _packed_matmul_te
from kvc.compiler.tvm.schedules import CpuPackedMatmul, CpuWeightMatmul
from kvc.compiler.tvm.target import TargetSpec, host_cpu
from kvc.passes.lower_tvm_weight_codes import PackedWeight, pack_float, pack_quantized, unpack
from kvc.passes.weight_quantize import quantize_blocks

from interleaved_timing import interleaved_times  # benchmarks/, the script's folder


def _i64(v: int):
    return tirx.IntImm("int64", v)


def packed_kernel(packed: PackedWeight, target, batch=None):
    """Built for ``batch`` rows (default 1; a tirx.Var for a symbolic batch)."""
    a = packed.attributes
    x = te.placeholder((batch if batch is not None else _i64(1), _i64(1), _i64(a["K"])), "float32", name="x")
    weights = [te.placeholder([_i64(d) for d in w.shape], str(w.dtype), name=f"w{i}")
               for i, w in enumerate(_arrays(packed))]
    rest = weights[1:] + [None] * (3 - len(weights))
    y = _packed_matmul_te(x, weights[0], rest[0], rest[1], a["K"], a["N"], a["tile"], a["bits"], a["block_size"],
                          a["code_offset"])
    sch = CpuPackedMatmul().apply(te.create_prim_func([x, *weights, y]), target, False)
    return tvm.compile(sch.mod, target=target)


def row_major_kernel(k: int, n: int, target):
    x = te.placeholder((_i64(1), _i64(1), _i64(k)), "float32", name="x")
    w = te.placeholder((_i64(k), _i64(n)), "float32", name="w")
    r = te.reduce_axis((_i64(0), _i64(k)), "r")
    y = te.compute((_i64(1), _i64(1), _i64(n)), lambda a, b, j: te.sum(x[a, b, r] * w[r, j], axis=r), name="y")
    sch = CpuWeightMatmul().apply(te.create_prim_func([x, w, y]), target, False)
    return tvm.compile(sch.mod, target=target)


def _arrays(packed: PackedWeight) -> list[np.ndarray]:
    return [a for a in (packed.codes, packed.scale, packed.zero_point) if a is not None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=576)
    parser.add_argument("--n", type=int, default=32000)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--rows", type=int, default=1, help="rows of a batched decode step (symbolic batch)")
    args = parser.parse_args()
    k, n = args.k, args.n
    target = TargetSpec(llvm_cpu=host_cpu(), num_cores=len(os.sched_getaffinity(0))).tvm_target()
    rng = np.random.default_rng(0)
    rows = args.rows
    x = rng.standard_normal((rows, 1, k), dtype=np.float32)
    w = rng.standard_normal((k, n), dtype=np.float32)
    y = tvm.runtime.tensor(np.zeros((rows, 1, n), np.float32))
    tx = tvm.runtime.tensor(x)
    variants = {"numpy fp32 W[K,N]": (lambda: x[:, 0] @ w, w.nbytes, w)}
    batch = tirx.Var("batch", "int64") if rows > 1 else None
    if rows == 1:
        lib, tw = row_major_kernel(k, n, target), tvm.runtime.tensor(w)
        variants["old fp32 W[K,N]"] = (lambda: lib(tx, tw, y), w.nbytes, w)
    schemes = {"packed fp32": pack_float(w)}
    for bits in (8, 4):
        for symmetric in (True, False):
            q = quantize_blocks(w, bits, args.block, symmetric, axis=0)
            zp = None if q.zero_point is None else q.zero_point.astype(np.int32)
            name = f"packed int{bits} {'sym' if symmetric else 'asym'}"
            schemes[name] = pack_quantized(q.codes.astype(np.int32), bits, symmetric, q.scale, zp, args.block)
    for name, packed in schemes.items():
        plib, arrays = packed_kernel(packed, target, batch), [tvm.runtime.tensor(a) for a in _arrays(packed)]
        variants[name] = (lambda plib=plib, arrays=arrays: plib(tx, *arrays, y),
                          sum(a.nbytes for a in _arrays(packed)), unpack(packed))
    if rows > 1:  # the same symbolic-batch fp32 kernel on one row, for the batch's cost over batch 1
        fp32 = schemes["packed fp32"]
        plib, arrays = packed_kernel(fp32, target, batch), [tvm.runtime.tensor(a) for a in _arrays(fp32)]
        x1, y1 = tvm.runtime.tensor(x[:1].copy()), tvm.runtime.tensor(np.zeros((1, 1, n), np.float32))
        variants["packed fp32, 1 row"] = (lambda plib=plib, arrays=arrays: plib(x1, *arrays, y1), w.nbytes, None)
    for name, (fn, _, weights) in variants.items():  # check each, warm up
        got = fn()
        if weights is None:
            continue
        got = got if name.startswith("numpy") else y.numpy()[:, 0]
        np.testing.assert_allclose(got.reshape(-1), (x[:, 0].astype(np.float64) @ weights).reshape(-1),
                                   rtol=1e-4, atol=1e-3, err_msg=name)
    measured = interleaved_times({name: fn for name, (fn, _, _) in variants.items()}, args.reps)
    times, copy = measured.seconds, measured.copy_median
    print(f"K {k} N {n} block {args.block}, {rows} row(s): numpy copy bandwidth median {copy:.1f} GB/s "
          f"(max {max(measured.copy_gbs):.1f}); "
          f"{args.reps} interleaved reps, {len(os.sched_getaffinity(0))} CPUs")
    reference = "old fp32 W[K,N]" if rows == 1 else "packed fp32, 1 row"
    base = statistics.median(times[reference])
    for name, ts in times.items():
        med, nbytes = statistics.median(ts), variants[name][1]
        print(f"  {name:20s} median {med * 1e3:7.3f} ms  min {min(ts) * 1e3:7.3f} ms  {nbytes / 1e6:6.1f} MB  "
              f"{nbytes / med / 1e9:6.1f} GB/s ({100 * nbytes / med / 1e9 / copy:5.1f}% of copy)  "
              f"vs {reference} {med / base:.3f}")


if __name__ == "__main__":
    main()
