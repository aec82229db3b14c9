"""CPU (llvm) schedule for a row reduction followed by elementwise work on the same rows:
RMSNorm / LayerNorm style kernels, Y[rows..., n] = f(X[rows..., n], reduce_n(g(X[rows..., :]))).

Why not dlight's cpu.Reduction: on such a kernel it parallelizes the epilogue's n loop and
computes the whole row reduction inside each of its iterations, so an RMSNorm of width 576 does
576 x 576 multiply-adds instead of 576 (measured: ~0.4 ms per norm, 49 norms per decode step of
llama-100m, the largest share of the step). Here each row is reduced once:

  parallel over rows (only when there can be more than one)
    producers inlined; the row's reduction computed once, at the row loop
    epilogue over n, vectorized
"""
from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight import analysis
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

LANES = 8  # AVX2 fp32 vector


class CpuRowReduction(ScheduleRule):
    """Schedules PrimFuncs whose reduction blocks feed an elementwise output over the same rows."""

    def is_target_available(self, target: Target) -> bool:
        return target.kind.name == "llvm"

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        if func.attrs is not None and "tirx.is_scheduled" in func.attrs:
            return None
        sch = s_tir.Schedule(func)
        infos = analysis.normalize_prim_func(sch)
        if not _is_row_reduction(infos):
            return None
        try:
            _schedule(sch, infos)
        except s_tir.ScheduleError:
            return None
        return sch


def _is_row_reduction(infos) -> bool:
    """Reduction blocks (RMSNorm: 1, LayerNorm: 2) then spatial ones, the last spatial."""
    if not infos or len(infos) < 2 or not infos[-1].is_injective():
        return False
    if all(info.is_injective() for info in infos):
        return False
    if any(it.kind not in ("S", "R") for info in infos for it in info.iters):
        return False
    return len(infos[-1].iters) >= 1


def _schedule(sch: s_tir.Schedule, infos) -> None:
    reductions = [info.block_rv for info in infos if not info.is_injective()]
    output = infos[-1].block_rv
    # Inline the spatial blocks (casts, squares, rsqrt, weight casts) into their consumers: the
    # reduction then reads the input directly and the epilogue is one expression.
    for info in infos[:-1]:
        if any(_same(sch, info.block_rv, r) for r in reductions):
            continue
        try:
            sch.compute_inline(info.block_rv)
        except s_tir.ScheduleError:
            try:
                sch.reverse_compute_inline(info.block_rv)
            except s_tir.ScheduleError:
                pass
    *rows, _cols = sch.get_loops(output)
    if rows:  # else a single row (unit dims normalized away): everything runs once, in order
        _per_row(sch, output, sch.fuse(*rows) if len(rows) > 1 else rows[0])
    _vectorize_inner(sch, sch.get_loops(output)[-1])


def _per_row(sch: s_tir.Schedule, output, row) -> None:
    if not _is_one(sch.get(row).extent):
        sch.parallel(row)
    # Whatever is left before the output (the reduction, blocks that could not be inlined) is
    # computed per row, in reverse order so each block's consumers are already under the row.
    remaining = [b for b in sch.get_child_blocks(analysis.get_root_block(sch)) if not _same(sch, b, output)]
    for block in reversed(remaining):
        sch.compute_at(block, row, preserve_unit_loops=True)


def _vectorize_inner(sch: s_tir.Schedule, loop) -> None:
    extent = sch.get(loop).extent
    if isinstance(extent, tirx.IntImm) and int(extent) % LANES == 0 and int(extent) > LANES:
        _, inner = sch.split(loop, [None, LANES])
        sch.vectorize(inner)


def _is_one(extent) -> bool:
    return isinstance(extent, tirx.IntImm) and int(extent) == 1


def _same(sch: s_tir.Schedule, a, b) -> bool:
    return sch.get(a).same_as(sch.get(b))
