"""CPU (llvm) schedule for the model's weight matmuls: Y[rows..., n] = sum_k X[rows..., k] * W[k, n].

dlight's CPU GEMV rule only handles an inner reduction (W stored [n, k]); ONNX exports store
projection weights [k, n] (outer reduction), so without this rule every projection ran as naive
single-threaded scalar loops. The schedule here is register blocking along n:

  parallel over (n blocks of NB, row blocks of MB)
    for k:  for each of the MB rows:  acc[row, 0:NB] += x[row, k] * W[k, n0:n0+NB]   (vector FMA)
    store acc

Each W row segment W[k, n0:n0+NB] is read once per row block, contiguously, so a decode step
(rows = batch, MB = 1) streams the weights at memory bandwidth; prefill (rows = batch x seq)
uses MB > 1 rows per block so each loaded weight vector feeds MB FMAs.
"""
from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.s_tir.dlight import analysis
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target


@dataclass(frozen=True)
class MatmulTiles:
    rows: int  # MB: rows (tokens) sharing each loaded weight vector
    cols: int  # NB: output columns accumulated in registers per block
    lanes: int  # vector width in elements


# Decode: one row per block, 256 columns (32 AVX2 accumulators: they spill to L1, which is cheap
# next to DRAM). Wider blocks read 1 KB contiguous per weight row instead of 256 B, which the
# hardware prefetcher streams far better: llama-100m's lm_head GEMV (576 x 32000) ran 0.66x the
# time of 64 columns, 576 x 1536 0.35x (benchmarks/tvm_gemv_layouts.py, interleaved, 2-core EPYC
# under load). Prefill: a 4 x 32 register tile (16 accumulators); larger tiles spill there.
DECODE_TILES = MatmulTiles(rows=1, cols=256, lanes=8)
PREFILL_TILES = MatmulTiles(rows=4, cols=32, lanes=8)


@dataclass(frozen=True)
class WeightMatmul:
    """The loops of a recognised Y[rows..., n] += X[rows..., k] * W[k, n] block."""
    block: s_tir.schedule.SBlockRV
    row_loops: list  # loops of the leading spatial dims (batch, seq, ...)
    col_loop: object  # n
    red_loop: object  # k
    cols: int  # extent of n
    many_rows: bool  # rows depend on a symbolic dim besides the leading one (prefill's seq)
    epilogues: list  # elementwise blocks after the matmul (activation, residual add), in order


class TiledCpuMatmulRule(ScheduleRule):
    """A llvm rule for one recognised matmul block (+ elementwise epilogues), tiled for decode or prefill:
    subclasses say what they recognise (``match``) and how they tile it (``schedule``)."""

    def __init__(self, decode: MatmulTiles = DECODE_TILES, prefill: MatmulTiles = PREFILL_TILES):
        self.decode, self.prefill = decode, prefill

    def is_target_available(self, target: Target) -> bool:
        return target.kind.name == "llvm"

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        found = self.match(sch)
        if found is None:
            return None
        try:
            self.schedule(sch, found, target)
        except s_tir.ScheduleError:  # an epilogue that cannot be inlined into the tile's store
            return None
        return sch

    def match(self, sch: s_tir.Schedule):  # pragma: no cover - abstract
        raise NotImplementedError

    def schedule(self, sch: s_tir.Schedule, found, target: Target) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class CpuWeightMatmul(TiledCpuMatmulRule):
    """Schedules single-block PrimFuncs computing X @ W with a 2-D W; others are left to later rules."""

    def match(self, sch: s_tir.Schedule) -> WeightMatmul | None:
        return _match(sch)

    def schedule(self, sch: s_tir.Schedule, found: WeightMatmul, target: Target) -> None:
        _schedule(sch, found, self.prefill if found.many_rows else self.decode)


def is_weight_matmul(func: tirx.PrimFunc) -> bool:
    """Whether ``func`` is X @ W[k, n] (plus elementwise epilogues), the kernels this rule schedules."""
    return _match(s_tir.Schedule(func)) is not None


def _match(sch: s_tir.Schedule) -> WeightMatmul | None:
    infos = analysis.normalize_prim_func(sch)
    if not infos or not all(e.is_injective() for e in infos[1:]):
        return None  # anything but a matmul followed by elementwise epilogues (decode's fused kernels)
    info = infos[0]
    if not spatial_then_one_reduction(info):
        return None
    block = sch.get(info.block_rv)
    if len(block.reads) != 2 or len(block.writes) != 1 or not _is_multiply_add(block):
        return None
    spatial = [it.var for it in block.iter_vars[:-1]]
    k, n = block.iter_vars[-1].var, spatial[-1]
    out = _index_vars(block.writes[0])
    if out != spatial:
        return None
    reads = [_index_vars(r) for r in block.reads]
    weight_first = reads[0] == [k, n]
    x, w = (reads[1], reads[0]) if weight_first else (reads[0], reads[1])
    if w != [k, n] or x != spatial[:-1] + [k]:
        return None
    if not isinstance(info.iters[-2].dom, int):
        return None
    loops = [it.loop_rv for it in info.iters]
    return WeightMatmul(info.block_rv, loops[:-2], loops[-2], loops[-1], info.iters[-2].dom, has_many_rows(info),
                        [e.block_rv for e in infos[1:]])


def spatial_then_one_reduction(info) -> bool:
    """The block's loops are rows..., n (spatial) then k (one reduction), as a matmul's are."""
    kinds = "".join(it.kind for it in info.iters)
    return len(kinds) >= 2 and kinds[:-1] == "S" * (len(kinds) - 1) and kinds[-1] == "R"


def has_many_rows(info) -> bool:
    """Whether the matmul's rows (the dims before n, k) depend on a symbolic dim besides the leading one
    (prefill's seq) or number more than one statically: the prefill tile; else one row per task (decode)."""
    row_extents = [it.dom for it in info.iters[:-2]]
    symbolic = [e for e in row_extents if not isinstance(e, int)]
    static = 1
    for e in row_extents:
        static *= e if isinstance(e, int) else 1
    return len(symbolic) > 1 or static > 1


def _is_multiply_add(block) -> bool:
    """body: Y[...] = Y[...] + X[...] * W[...] (casts allowed around the operands)."""
    body = block.body
    if not isinstance(body, tirx.BufferStore) or not isinstance(body.value, tirx.Add):
        return False
    def strip_casts(expr):
        while isinstance(expr, tirx.Cast):
            expr = expr.value
        return expr
    return any(isinstance(strip_casts(side), tirx.Mul) for side in (body.value.a, body.value.b))


def _index_vars(region) -> list | None:
    """The block vars indexing a buffer region point-wise (constant indices of unit dims skipped),
    or None if an index is anything else."""
    out = []
    for r in region.region:
        if not (isinstance(r.extent, tirx.IntImm) and int(r.extent) == 1):
            return None
        if isinstance(r.min, tirx.Var):
            out.append(r.min)
        elif not isinstance(r.min, tirx.IntImm):
            return None
    return out


def _fit(tiles: MatmulTiles, cols: int) -> MatmulTiles:
    """The largest power-of-two fraction of the column tile that divides n (no tail loop to mask)."""
    block = tiles.cols
    while cols % block:
        block //= 2
    return MatmulTiles(tiles.rows, block, min(tiles.lanes, block))


def _schedule(sch: s_tir.Schedule, m: WeightMatmul, tiles: MatmulTiles) -> None:
    tiles = _fit(tiles, m.cols)
    # Only the innermost row dim is tiled (a fused batch*seq dim would index the register tile
    # through a division by the symbolic seq, and TVM could then no longer shrink the tile).
    *outer_rows, rows = m.row_loops or [sch.add_unit_loop(m.col_loop)]  # all row dims of extent 1
    row_outer, row_inner = sch.split(rows, [None, tiles.rows])
    col_outer, col_inner = sch.split(m.col_loop, [None, tiles.cols])
    sch.reorder(col_outer, *outer_rows, row_outer, m.red_loop, row_inner, col_inner)
    work = sch.fuse(col_outer, *outer_rows, row_outer)
    sch.parallel(work)
    store_register_tile(sch, m.block, m.epilogues, work)
    sch.unroll(row_inner)
    vectors, lanes = sch.split(col_inner, [None, tiles.lanes])
    sch.unroll(vectors)
    sch.vectorize(lanes)
    sch.decompose_reduction(m.block, m.red_loop)


def store_register_tile(sch: s_tir.Schedule, block, epilogues: list, work) -> None:
    """Accumulate ``block`` in a register tile stored once per ``work`` item, with the elementwise
    ``epilogues`` (activation, residual add) applied as one expression on that store."""
    accumulate = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(accumulate, work)
    sch.vectorize(sch.get_loops(accumulate)[-1])
    if epilogues:
        *inner, last = epilogues
        for epilogue in inner:
            sch.compute_inline(epilogue)
        sch.reverse_compute_inline(last)
