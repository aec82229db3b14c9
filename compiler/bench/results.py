"""Rows of a bench run: one per (engine, cache dtype, capacity, batch, context, metric)."""
from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from typing import Optional

from kvc.compiler.bench.bandwidth import Roofline, mean_attended_tokens
from kvc.compiler.bench.measure import Samples

PREFILL = "prefill_tok_s"  # prompt tokens (all sequences) per second, prompt of `context` tokens
DECODE = "decode_ms_per_token"  # milliseconds per decode step (one new token per sequence) at depth `context`


@dataclass(frozen=True)
class Row:
    engine: str
    kv_dtype: str
    context: int
    metric: str
    unit: str
    median: float
    spread: float  # max - min over the timed repetitions, same unit
    min: float
    max: float
    reps: int
    bytes_per_token: Optional[float] = None  # decode: bytes one step must read (weights + live KV of every row)
    bandwidth_fraction: Optional[float] = None  # decode: floor_ms / median (achieved bytes/s over measured)
    batch: int = 1
    capacity: Optional[int] = None  # cache slots preallocated (kvc engines, torch-static); None: grows (concat)
    fill: str = "real"  # how decode reached `context`: "real" prefill or "synthetic" (see measure.py)
    floor_ms: Optional[float] = None  # decode: bytes_per_token / measured bandwidth (the roofline)
    kv_bytes_per_cached_token: Optional[int] = None  # one row's stored K/V bytes per token (scales included)
    source: str = "kvc bench"  # who measured it ("kvc bench" or a peer runner, see benchmarks/peers)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Row":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def summary_row(engine: str, kv_dtype: str, context: int, metric: str, unit: str, values: list[float],
                **extra) -> Row:
    """A row of the median and min/max of ``values``."""
    return Row(engine, kv_dtype, context, metric, unit, median=statistics.median(values),
               spread=max(values) - min(values), min=min(values), max=max(values), reps=len(values), **extra)


@dataclass(frozen=True)
class RowContext:
    """What the rows of one engine need besides its samples."""

    engine: str
    kv_dtype: str
    batch: int
    gen: int
    capacity: Optional[int]
    fill: str
    roofline: Roofline  # weights, this engine's stored KV bytes per token, measured bandwidth


def decode_row(ctx: RowContext, context: int, step_s: list[float]) -> Row:
    moved = ctx.roofline.bytes_per_step(mean_attended_tokens(context, ctx.gen), ctx.batch)
    floor_s = moved / ctx.roofline.bandwidth
    return summary_row(ctx.engine, ctx.kv_dtype, context, DECODE, "ms", [1e3 * s for s in step_s],
                       bytes_per_token=moved, bandwidth_fraction=floor_s / _median(step_s), batch=ctx.batch,
                       capacity=ctx.capacity, fill=ctx.fill, floor_ms=1e3 * floor_s,
                       kv_bytes_per_cached_token=ctx.roofline.kv_bytes_per_token)


def rows_for_depth(ctx: RowContext, context: int, samples: Samples) -> list[Row]:
    rows = []
    if samples.prefill_s:  # a real prefill, whatever filled the cache for decode
        rows.append(summary_row(ctx.engine, ctx.kv_dtype, context, PREFILL, "tok/s",
                                [ctx.batch * context / s for s in samples.prefill_s], batch=ctx.batch,
                                capacity=ctx.capacity, fill="real"))
    return rows + [decode_row(ctx, context, samples.decode_step_s)]


def _median(values: list[float]) -> float:
    return statistics.median(values)
