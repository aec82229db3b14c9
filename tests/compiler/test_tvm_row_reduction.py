"""kvc's CPU schedule for row reductions with an elementwise epilogue (RMSNorm, LayerNorm as TVM
legalizes them): it takes them, reduces each row once, and matches numpy on fresh inputs
(float32, rtol 1e-5 / atol 1e-5) for a static single row, symbolic batch, and batch x seq rows."""
from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax, tirx  # noqa: E402

from kvc.compiler.tvm.schedules import CpuRowReduction  # noqa: E402

LLVM = {"kind": "llvm"}
WIDTH = 48
EPS = 1e-5


def _legalized(norm: str, x_dims: list) -> tirx.PrimFunc:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_dims, "float32"))
    gamma = relax.Var("gamma", relax.TensorType([WIDTH], "float32"))
    beta = relax.Var("beta", relax.TensorType([WIDTH], "float32"))
    with bb.function("main", [x, gamma, beta]):
        with bb.dataflow():
            if norm == "rms":
                y = relax.op.nn.rms_norm(x, gamma, [-1], EPS)
            else:
                y = relax.op.nn.layer_norm(x, gamma, beta, [-1], EPS)
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod = relax.transform.LegalizeOps()(bb.get())
    func = next(f for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc))
    return func.with_attr("global_symbol", "main")


def _numpy(norm: str, x, gamma, beta):
    x = x.astype(np.float64)
    if norm == "rms":
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + EPS) * gamma
    centered = x - x.mean(-1, keepdims=True)
    return centered / np.sqrt((centered * centered).mean(-1, keepdims=True) + EPS) * gamma + beta


@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("rows", ["static-1", "batch", "batch-seq"])
def test_row_reduction_matches_numpy(norm, rows):
    b, s = tirx.Var("b", "int64"), tirx.Var("s", "int64")
    dims, shape = {"static-1": ([1, 1, WIDTH], (1, 1, WIDTH)), "batch": ([b, 1, WIDTH], (3, 1, WIDTH)),
                   "batch-seq": ([b, s, WIDTH], (2, 7, WIDTH))}[rows]
    func = _legalized(norm, dims)
    target = tvm.target.Target(LLVM)
    sch = CpuRowReduction().apply(func, target, False)
    assert sch is not None, "rule did not take the norm"
    rng = np.random.default_rng()
    x = rng.standard_normal(shape, dtype=np.float32)
    gamma, beta = (rng.standard_normal(WIDTH, dtype=np.float32) for _ in range(2))
    lib = tvm.compile(sch.mod, target=target)
    out = tvm.runtime.tensor(np.zeros(shape, np.float32))
    inputs = (x, gamma) if norm == "rms" else (x, gamma, beta)  # the legalized RMSNorm takes no beta
    lib(*(tvm.runtime.tensor(a) for a in inputs), out)
    np.testing.assert_allclose(out.numpy(), _numpy(norm, x, gamma, beta), rtol=1e-5, atol=1e-5)


def test_single_row_reduces_once():
    """The single-row norm has one reduction loop nest at the top, not one per output element."""
    func = CpuRowReduction().apply(_legalized("rms", [1, 1, WIDTH]), tvm.target.Target(LLVM), False).mod["main"]
    top_loops = [s for s in func.body.block.body.seq] if isinstance(func.body.block.body, tirx.SeqStmt) else []
    assert len(top_loops) == 2 and all(isinstance(s, tirx.For) for s in top_loops)
    assert not any(s.kind == tirx.ForKind.PARALLEL for s in top_loops)


def test_matmuls_and_pure_elementwise_are_left_to_other_rules():
    from tvm import te

    x = te.placeholder((1, 8), "float32", name="x")
    y = te.compute((1, 8), lambda i, j: x[i, j] * 2, name="y")
    assert CpuRowReduction().apply(te.create_prim_func([x, y]), tvm.target.Target(LLVM), False) is None
    w = te.placeholder((8, 4), "float32", name="w")
    k = te.reduce_axis((0, 8), "k")
    z = te.compute((1, 4), lambda i, j: te.sum(x[i, k] * w[k, j], axis=k), name="z")
    assert CpuRowReduction().apply(te.create_prim_func([x, w, z]), tvm.target.Target(LLVM), False) is None
