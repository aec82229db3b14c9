"""kvc's CPU schedule for weight matmuls: which PrimFuncs it takes, and exact results on fresh inputs."""
from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import te, tirx  # noqa: E402

from kvc.compiler.tvm.schedules import CpuWeightMatmul  # noqa: E402

LLVM = {"kind": "llvm"}


def i64(value: int):
    return tirx.IntImm("int64", value)


def weight_matmul(rows: tuple, k: int, n: int, transpose_weight: bool = False):
    """Y[rows..., n] = X[rows..., k] @ W[k, n] as legalization emits it (W[n, k] if transposed)."""
    x = te.placeholder((*rows, i64(k)), "float32", name="x")
    w = te.placeholder((i64(n), i64(k)) if transpose_weight else (i64(k), i64(n)), "float32", name="w")
    r = te.reduce_axis((i64(0), i64(k)), "r")

    def body(*idx):
        *row, col = idx
        weight = w[col, r] if transpose_weight else w[r, col]
        return te.sum(x[(*row, r)] * weight, axis=r)

    y = te.compute((*rows, i64(n)), body, name="y")
    return te.create_prim_func([x, w, y])


def run(func, x: np.ndarray, w: np.ndarray, out_shape) -> np.ndarray:
    sch = CpuWeightMatmul().apply(func, tvm.target.Target(LLVM), False)
    assert sch is not None, "rule did not take a weight matmul"
    lib = tvm.compile(sch.mod, target=tvm.target.Target(LLVM))
    out = tvm.runtime.tensor(np.zeros(out_shape, np.float32))
    lib(tvm.runtime.tensor(x), tvm.runtime.tensor(w), out)
    return out.numpy()


@pytest.mark.parametrize("batch, seq, k, n", [
    (1, 1, 64, 64),  # decode, one sequence
    (3, 1, 48, 96),  # decode, batch 3 (rows = batch)
    (1, 7, 64, 192),  # prefill, rows not a multiple of the 4-row tile
    (2, 13, 40, 36),  # n = 36: column tile shrinks to a divisor (4)
    (1, 5, 16, 7),  # odd n: scalar columns
    (1, 1, 33, 1280),  # decode's full 256-column tile (5 blocks), odd k
    (3, 1, 40, 800),  # n = 800: the decode tile shrinks to 32
])
def test_symbolic_rows_match_numpy(batch, seq, k, n):
    b, s = tirx.Var("batch", "int64"), tirx.Var("seq", "int64")
    rows = (b, i64(1)) if seq == 1 else (b, s)
    rng = np.random.default_rng(batch * 1000 + seq * 10 + k + n)
    x = rng.standard_normal((batch, seq, k), dtype=np.float32)
    w = rng.standard_normal((k, n), dtype=np.float32)
    got = run(weight_matmul(rows, k, n), x, w, (batch, seq, n))
    np.testing.assert_allclose(got, x.astype(np.float64) @ w.astype(np.float64), rtol=1e-5, atol=1e-4)


def test_static_single_row_matches_numpy():
    rng = np.random.default_rng(7)
    x, w = rng.standard_normal((1, 1, 32), dtype=np.float32), rng.standard_normal((32, 128), dtype=np.float32)
    got = run(weight_matmul((i64(1), i64(1)), 32, 128), x, w, (1, 1, 128))
    np.testing.assert_allclose(got, x.astype(np.float64) @ w, rtol=1e-5, atol=1e-4)


def test_other_functions_are_left_to_later_rules():
    rule, target = CpuWeightMatmul(), tvm.target.Target(LLVM)
    b = tirx.Var("batch", "int64")
    # W stored [n, k] (inner reduction) is dlight's GEMV rule's case, not this rule's.
    assert rule.apply(weight_matmul((b, i64(1)), 16, 16, transpose_weight=True), target, False) is None
    x = te.placeholder((b, i64(16)), "float32", name="x")
    relu = te.compute((b, i64(16)), lambda i, j: te.max(x[i, j], 0.0), name="relu")
    assert rule.apply(te.create_prim_func([x, relu]), target, False) is None
    r = te.reduce_axis((i64(0), i64(16)), "r")
    total = te.compute((b,), lambda i: te.sum(x[i, r], axis=r), name="total")
    assert rule.apply(te.create_prim_func([x, total]), target, False) is None
    assert rule.apply(weight_matmul((b, i64(1)), 16, 16), tvm.target.Target({"kind": "cuda"}), False) is None
