"""Rows of a bench run: one per (engine, cache dtype, context, metric)."""
from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from typing import Optional

from kvc.compiler.bench.bandwidth import decode_bytes_per_step, mean_attended_tokens
from kvc.compiler.bench.measure import Samples
from kvc.models.config import ModelConfig

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
    bytes_per_token: Optional[float] = None  # decode: bytes one step must read (weights + KV at this depth)
    bandwidth_fraction: Optional[float] = None  # decode: achieved bytes/s over the measured bandwidth

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _row(engine: str, kv_dtype: str, context: int, metric: str, unit: str, values: list[float], **extra) -> Row:
    return Row(engine, kv_dtype, context, metric, unit, median=statistics.median(values),
               spread=max(values) - min(values), min=min(values), max=max(values), reps=len(values), **extra)


@dataclass(frozen=True)
class RowContext:
    """What the byte accounting of one engine's rows needs."""

    config: ModelConfig
    engine: str
    kv_dtype: str
    per_token_scales: bool
    batch: int
    gen: int
    bandwidth: float  # measured bytes/s


def rows_for_depth(ctx: RowContext, context: int, samples: Samples) -> list[Row]:
    prefill = [ctx.batch * context / s for s in samples.prefill_s]
    decode_ms = [1e3 * s for s in samples.decode_step_s]
    moved = decode_bytes_per_step(ctx.config, ctx.kv_dtype, mean_attended_tokens(context, ctx.gen), ctx.batch,
                                  ctx.per_token_scales)
    median_s = statistics.median(samples.decode_step_s)
    return [_row(ctx.engine, ctx.kv_dtype, context, PREFILL, "tok/s", prefill),
            _row(ctx.engine, ctx.kv_dtype, context, DECODE, "ms", decode_ms, bytes_per_token=moved,
                 bandwidth_fraction=moved / median_s / ctx.bandwidth)]
