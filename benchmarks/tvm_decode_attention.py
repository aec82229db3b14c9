"""kvc's TVM decode-attention kernel (kvc.compiler.tvm.kernels.decode_attention) for each cache dtype, one layer:
one new query token per row attending to ``--context`` live slots of a ``--capacity``-slot ring.

    python benchmarks/tvm_decode_attention.py [--heads 9 --kv-heads 3 --head-dim 64] [--batch 1]
                                              [--context 8192] [--capacity 8192] [--reps 50]

All dtypes run interleaved in one process, rep by rep, next to a numpy copy-bandwidth measurement (which also
evicts the caches, as 24 layers of cache would), so their ratios hold on a loaded machine. TVM's thread pool is
sized as the TVM engine sizes it. GB/s counts the live cache bytes each variant reads (K and V codes plus
per-token scales for int8 / fp8), which is what the kernel must move; the query and outputs are negligible.
Every variant is checked against float64 numpy on its dequantized cache first.
"""
from __future__ import annotations

import argparse
import os
import statistics

import ml_dtypes
import numpy as np
import tvm
from tvm import relax

from kvc.compiler.tvm.kernels.decode_attention import DecodeAttentionSpec, emit_decode_attention
from kvc.compiler.tvm.kernels.kv_read import ScaleLayout
from kvc.compiler.tvm.target import TargetSpec, build, converts_half_in_hardware, has_avx512bw, host_cpu
from kvc.runtime.tvm_engine import configure_threads

from interleaved_timing import interleaved_times  # benchmarks/, the script's folder

# int8 is read as the engine reads it on this CPU (integer dot products on AVX-512 BW); int8-float as without
DTYPES = {"fp32": "float32", "fp16": "float16", "int8": "int8", "int8-float": "int8", "fp8": "float8_e4m3fn"}
QMAX = {"int8": 127.0, "float8_e4m3fn": 448.0}


def kernel(spec: DecodeAttentionSpec, batch: int, capacity: int, target: TargetSpec):
    """The VM function (q, k, v, lengths[, k_scale, v_scale]) -> out."""
    K, D = spec.num_kv_heads, spec.head_dim
    q = relax.Var("q", relax.TensorType((batch, spec.num_heads, 1, D), "float32"))
    k, v = (relax.Var(n, relax.TensorType((batch, K, capacity, D), spec.cache_dtype)) for n in "kv")
    lengths = relax.Var("lengths", relax.TensorType((batch,), "int64"))
    params, scales = [q, k, v, lengths], (None, None)
    if spec.scale_layout is ScaleLayout.PER_TOKEN:
        scales = tuple(relax.Var(n, relax.TensorType((batch, K, capacity, 1), "float32")) for n in ("ks", "vs"))
        params += list(scales)
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(emit_decode_attention(bb, spec, q, k, v, lengths, *scales))
        bb.emit_func_output(out)
    executable = build(bb.get(), target)
    return relax.VirtualMachine(executable, tvm.cpu())["main"]


def stored(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(codes, per-token scales or None, dequantized float64) of ``x`` [B, K, C, D] in ``dtype``."""
    if dtype not in QMAX:
        codes = x.astype(dtype)
        return codes, None, codes.astype(np.float64)
    scale = (np.abs(x).max(axis=-1, keepdims=True) / QMAX[dtype]).astype(np.float32)
    ratio = x / scale
    codes = np.rint(ratio).astype(np.int8) if dtype == "int8" else ratio.astype(ml_dtypes.float8_e4m3fn)
    return codes, scale, codes.astype(np.float64) * scale


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, context: int, scale: float) -> np.ndarray:
    B, H, _, D = q.shape
    G = H // k.shape[1]
    out = np.zeros(q.shape)
    for b in range(B):
        for h in range(H):
            scores = k[b, h // G, :context] @ q[b, h, 0].astype(np.float64) * scale
            p = np.exp(scores - scores.max())
            out[b, h, 0] = p / p.sum() @ v[b, h // G, :context]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--capacity", type=int, default=8192)
    parser.add_argument("--dtypes", default="fp32,fp16,int8,int8-float,fp8")
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    configure_threads(0)  # one thread per usable core, as the TVM engine runs (TVM's default is half)
    if not 0 < args.context <= args.capacity:
        parser.error("--context must be in 1..--capacity")
    rng = np.random.default_rng(0)
    B, K, C, D = args.batch, args.kv_heads, args.capacity, args.head_dim
    q = rng.standard_normal((B, args.heads, 1, D), dtype=np.float32)
    k_float, v_float = (rng.standard_normal((B, K, C, D), dtype=np.float32) for _ in range(2))
    lengths = tvm.runtime.tensor(np.full(B, args.context, np.int64))
    # for this machine, fp8 read as the engine reads it (through float16 where the CPU converts it in hardware)
    target = TargetSpec(llvm_cpu=host_cpu(), num_cores=len(os.sched_getaffinity(0)))
    hardware_half = converts_half_in_hardware(target.tvm_target())
    avx512_int16 = has_avx512bw(target.tvm_target())
    variants, live_bytes = {}, {}
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        layout = ScaleLayout.PER_TOKEN if dtype in QMAX else ScaleLayout.NONE
        spec = DecodeAttentionSpec(args.heads, K, D, cache_dtype=dtype, scale_layout=layout,
                                   hardware_half=hardware_half, avx512_int16=avx512_int16 and name == "int8")
        (kc, ks, k64), (vc, vs, v64) = stored(k_float, dtype), stored(v_float, dtype)
        feeds = [tvm.runtime.tensor(q), tvm.runtime.tensor(kc), tvm.runtime.tensor(vc), lengths]
        feeds += [tvm.runtime.tensor(s) for s in (ks, vs) if s is not None]
        fn = kernel(spec, B, C, target)
        np.testing.assert_allclose(fn(*feeds).numpy(), reference(q, k64, v64, args.context, spec.scale),
                                   rtol=1e-4, atol=1e-4 if spec.integer_dot else 1e-5, err_msg=name)
        variants[name] = lambda fn=fn, feeds=feeds: fn(*feeds)
        per_slot = kc.dtype.itemsize * D + (4 if ks is not None else 0)
        live_bytes[name] = 2 * B * K * args.context * per_slot
    measured = interleaved_times(variants, args.reps)
    copy = measured.copy_median
    print(f"decode attention, {args.heads} heads / {K} kv heads x {D}, batch {B}, context {args.context} of "
          f"{C} slots, fp8 {'through F16C' if hardware_half else 'by integer ops'}, int8 "
          f"{'by int16 dot products' if avx512_int16 else 'as float'}: numpy copy bandwidth median "
          f"{copy:.1f} GB/s; {args.reps} interleaved reps, {len(os.sched_getaffinity(0))} CPUs")
    base = statistics.median(measured.seconds[next(iter(variants))])
    for name, times in measured.seconds.items():
        med = statistics.median(times)
        gbs = live_bytes[name] / med / 1e9
        print(f"  {name:5s} median {med * 1e3:7.3f} ms  min {min(times) * 1e3:7.3f} ms  "
              f"{live_bytes[name] / 1e6:6.1f} MB live  {gbs:6.1f} GB/s ({100 * gbs / copy:5.1f}% of copy)  "
              f"time vs {next(iter(variants))} {med / base:.3f}")


if __name__ == "__main__":
    main()
