"""CPU (llvm) schedule for ai.kvc PackedMatMul kernels (kvc.compiler.tvm.converters.packed_matmul):
Y[rows..., n] = sum_k X[rows..., k] * W(k, n) with W read from a packed [N/T, K, T] slab per column block
(codes, possibly 4-bit, dequantized in the loop), plus elementwise epilogues.

  parallel over (column block of T, row blocks of MB)
    for k:  for each of the MB rows:  acc[row, cols] += x[row, k] * decode(slab[k, cols])   (vector FMA)
    store acc through the epilogue

Decode keeps the whole tile T in registers, so each parallel task streams one contiguous slab once: one
row per task at batch 1, groups of rows per task for a symbolic batch on AVX-512 (batched_row_tile).
Prefill (MB > 1 rows) tiles T into register-sized column groups. 4-bit tiles are split at the nibble
halves: each half is one contiguous run of bytes, decoded with a constant shift.
Quantized kernels sum each scale block's codes first (the converter's partial / xsum stages): those
are computed inside the loop over blocks, into registers, and scaled once per block.
"""
from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.s_tir.dlight import analysis
from tvm.target import Target

from kvc.compiler.tvm.converters.packed_matmul import ANNOTATION, HALF_ANNOTATION, STAGE_ANNOTATION
from kvc.compiler.tvm.schedules.cpu_matmul import (MatmulTiles, TiledCpuMatmulRule, has_many_rows,
                                                    spatial_then_one_reduction, store_register_tile)
from kvc.compiler.tvm.target import has_avx512


@dataclass(frozen=True)
class PackedMatmul:
    block: s_tir.schedule.SBlockRV
    row_loops: list
    col_loop: object
    red_loop: object
    tile: int  # T: columns per packed slab
    half: int  # 4-bit: columns per nibble half (T / 2); else 0
    many_rows: bool  # prefill: rows depend on a symbolic dim besides the leading one, or > 1 static
    epilogues: list
    stages: list  # quantized: the per-block sums (codes x inputs, and inputs alone) computed first


class CpuPackedMatmul(TiledCpuMatmulRule):
    """Schedules PrimFuncs whose first block is an annotated packed matmul followed by elementwise blocks."""

    def match(self, sch: s_tir.Schedule) -> PackedMatmul | None:
        return _match(sch)

    def schedule(self, sch: s_tir.Schedule, found: PackedMatmul, target: Target) -> None:
        if found.many_rows:
            _schedule_rows(sch, found, self.prefill)
        else:
            _schedule_decode(sch, found, self.decode.lanes, batched_row_tile(target, found.tile))


def is_packed_matmul(func: tirx.PrimFunc) -> bool:
    """Whether ``func`` is a PackedMatMul kernel (plus elementwise epilogues), the kernels this rule schedules."""
    return _match(s_tir.Schedule(func)) is not None


def _match(sch: s_tir.Schedule) -> PackedMatmul | None:
    infos = analysis.normalize_prim_func(sch)
    if not infos:
        return None
    found = [i for i, e in enumerate(infos) if ANNOTATION in sch.get(e.block_rv).annotations]
    if len(found) != 1:
        return None
    at = found[0]
    stages, info, epilogues = infos[:at], infos[at], infos[at + 1:]
    if not all(STAGE_ANNOTATION in sch.get(e.block_rv).annotations for e in stages):
        return None
    if not all(e.is_injective() for e in epilogues):
        return None
    if not spatial_then_one_reduction(info):
        return None
    annotations = sch.get(info.block_rv).annotations
    loops = [it.loop_rv for it in info.iters]
    return PackedMatmul(info.block_rv, loops[:-2], loops[-2], loops[-1], int(annotations[ANNOTATION]),
                        int(annotations[HALF_ANNOTATION]), has_many_rows(info),
                        [e.block_rv for e in epilogues], [e.block_rv for e in stages])


def _schedule_decode(sch: s_tir.Schedule, m: PackedMatmul, lanes: int, row_tile: "RowTile | None") -> None:
    """Decode: the whole T-column tile accumulates in registers over K. One row per task, unless the batch
    is symbolic and ``row_tile`` is given: then groups of its rows per task (_batched_rows)."""
    group = m.half or m.tile
    rows = m.row_loops or [sch.add_unit_loop(m.col_loop)]
    blocks, within = sch.split(m.col_loop, [None, m.tile])
    groups, cols = sch.split(within, [None, group])
    symbolic = [loop for loop in rows if not isinstance(sch.get(loop).extent, tirx.IntImm)]
    if row_tile is not None and len(symbolic) == 1:
        _batched_rows(sch, m, rows, symbolic[0], row_tile.rows, blocks, groups, cols)
        lanes = row_tile.lanes
    else:
        sch.reorder(blocks, *rows, m.red_loop, groups, cols)
        work = sch.fuse(blocks, *rows)
        sch.parallel(work)
        store_register_tile(sch, m.block, m.epilogues, work)
    sch.unroll(groups)
    _vector_columns(sch, cols, lanes)
    _stages_per_block(sch, m, lanes)
    sch.decompose_reduction(m.block, m.red_loop)


@dataclass(frozen=True)
class RowTile:
    rows: int  # batch rows sharing each weight load
    lanes: int  # vector width in elements


def batched_row_tile(target: Target, tile: int) -> RowTile | None:
    """The register tile of a batched decode step on ``target``: with AVX-512's 32 vector registers, 4 rows x
    a 64-column tile are 16 accumulators. One row per task (None) read each weight slab once per row, later
    rows from L2: llama-100m's lm_head (576 x 32000) at batch 4 took 1.5-1.6x its batch-1 time, with this
    tile ~1.1x (benchmarks/tvm_packed_gemv.py --rows 4). AVX2's 16 registers hold one 64-column row
    (8 accumulators) with room for little else, so other targets keep one row per task."""
    if not has_avx512(target):
        return None
    lanes = min(16, tile)
    accumulators_per_row = tile // lanes
    return RowTile(rows=min(4, 16 // accumulators_per_row), lanes=lanes)


def _batched_rows(sch: s_tir.Schedule, m: PackedMatmul, rows: list, symbolic, tile_rows: int, blocks, groups,
                  cols) -> None:
    """Parallel over column blocks; each task walks the batch in ``tile_rows``-row groups, every k's weights
    loaded once per group for all its rows. The group loop carries a partition hint, so the full groups
    compile without the batch bound's check and only the last partial group keeps it (with the check on
    every row, 8 rows took 2.2x the time)."""
    others = [loop for loop in rows if not loop.same_as(symbolic)]
    row_groups, row_tile = sch.split(symbolic, [None, tile_rows])
    sch.reorder(blocks, row_groups, m.red_loop, row_tile, *others, groups, cols)
    sch.parallel(blocks)
    store_register_tile(sch, m.block, m.epilogues, row_groups)
    sch.unroll(row_tile)
    sch.annotate(row_groups, "pragma_loop_partition_hint", 1)


def _schedule_rows(sch: s_tir.Schedule, m: PackedMatmul, tiles: MatmulTiles) -> None:
    """MB rows x a column group per task (as kvc.compiler.tvm.schedules.cpu_matmul's prefill tile)."""
    group = min(tiles.cols, m.half or m.tile)
    blocks, within = sch.split(m.col_loop, [None, m.tile])
    groups, cols = sch.split(within, [None, group])
    *outer_rows, rows = m.row_loops
    row_outer, row_inner = sch.split(rows, [None, tiles.rows])
    sch.reorder(blocks, groups, *outer_rows, row_outer, m.red_loop, row_inner, cols)
    work = sch.fuse(blocks, groups, *outer_rows, row_outer)
    sch.parallel(work)
    store_register_tile(sch, m.block, m.epilogues, work)
    sch.unroll(row_inner)
    _vector_columns(sch, cols, tiles.lanes)
    _stages_per_block(sch, m, tiles.lanes)
    sch.decompose_reduction(m.block, m.red_loop)


def _vector_columns(sch: s_tir.Schedule, cols, lanes: int) -> None:
    vectors, lane = sch.split(cols, [None, lanes])
    sch.unroll(vectors)
    sch.vectorize(lane)


def _stages_per_block(sch: s_tir.Schedule, m: PackedMatmul, lanes: int) -> None:
    """Each per-block sum computed into registers inside the matmul's loop over blocks (m.red_loop), with
    the block's K values outermost and the columns innermost as vectors."""
    block_var = sch.get(m.red_loop).loop_var
    for stage in reversed(m.stages):  # the stage the matmul reads first, then the ones it reads
        sch.compute_at(stage, m.red_loop)
        sch.set_scope(stage, 0, "local")
        loops = sch.get_loops(stage)
        depth = next(i for i, loop in enumerate(loops) if sch.get(loop).loop_var.same_as(block_var)) + 1
        *spatial, inner = loops[depth:]
        sch.reorder(inner, *spatial)
        extent = sch.get(spatial[-1]).extent if spatial else None
        if isinstance(extent, tirx.IntImm) and int(extent) > 1 and int(extent) % lanes == 0:
            vectors, lane = sch.split(spatial[-1], [None, lanes])
            sch.unroll(vectors)
            sch.vectorize(lane)
        sch.decompose_reduction(stage, inner)
