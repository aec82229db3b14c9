"""The timing loop, llama-bench style, per context depth d:

* fill: bring an empty cache to depth d once, either with a real prefill of a random d-token
  prompt or synthetically (FillMode.SYNTHETIC: a real prefill of a few tokens whose K/V rows are
  tiled to d slots and written straight into the cache, so depth 8192 costs seconds, not minutes;
  the values are real K/V of this model, only their positions repeat).
* decode (tg @ d): per repetition rewind to d and time ``gen`` greedy decode steps of one token
  each; warm-up repetitions first.
* prefill (pp d): time filling an empty cache with the d-token prompt, ``prefill_reps`` times.
  With prefill_reps 0 and a real fill, that first fill is the one sample (for engines whose
  prefill is too slow to repeat); with a synthetic fill and prefill_reps 0 no prefill is timed.
Rewinding only moves the cache length, so a repetition never pays for another fill."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from kvc.compiler.bench.options import FillMode
from kvc.compiler.bench.runners import CacheRows, Runner


@dataclass
class Samples:
    """Per timed repetition: seconds for the whole prefill, seconds per decode step."""

    prefill_s: list[float] = field(default_factory=list)
    decode_step_s: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class DepthPlan:
    """How one depth is measured (see the module docstring)."""

    gen: int
    reps: int
    warmup: int
    chunk: int  # longest prefill call
    prefill_reps: int
    fill: FillMode = FillMode.REAL
    time_prefill: bool = True  # False: no prefill samples at this depth (not even the first real fill)
    synthetic_tokens: int = 64


def fill(runner: Runner, prompt: np.ndarray, chunk: int) -> np.ndarray:
    """Prefill ``prompt`` [B, N] after the cached tokens, ``chunk`` tokens per call; last logits."""
    logits = None
    for start in range(0, prompt.shape[1], chunk):
        logits = runner.step(prompt[:, start:start + chunk])
    return logits


def tile_slots(rows: CacheRows, depth: int) -> CacheRows:
    """Repeat each tensor's slots (axis 2) until it holds ``depth`` of them."""
    out = {}
    for name, array in rows.items():
        reps = -(-depth // array.shape[2])
        out[name] = np.ascontiguousarray(np.tile(array, (1, 1, reps, 1))[:, :, :depth])
    return out


def synthetic_fill(runner: Runner, prompt: np.ndarray, chunk: int, seed_tokens: int) -> np.ndarray:
    """Bring an empty cache to depth prompt.shape[1] without prefilling it: prefill the first
    ``seed_tokens`` tokens, tile their K/V rows (stored dtype, scales included) to the depth and
    write them into the cache. Returns the logits of the real prefill (to start greedy decode)."""
    depth = prompt.shape[1]
    seed = min(depth, seed_tokens)
    runner.rewind(0)
    logits = fill(runner, prompt[:, :seed], min(chunk, seed))
    if depth > seed:
        runner.write_cache(tile_slots(runner.read_cache(seed), depth))
    return logits


def greedy_decode(runner: Runner, logits: np.ndarray, steps: int) -> list[np.ndarray]:
    """``steps`` decode steps, each feeding back the argmax of the previous logits; the tokens fed."""
    fed = []
    for _ in range(steps):
        tokens = np.argmax(logits, axis=-1).astype(np.int64)
        fed.append(tokens)
        logits = runner.step(tokens[:, None])
    return fed


def _timed_fill(runner: Runner, prompt: np.ndarray, chunk: int) -> tuple[float, np.ndarray]:
    runner.rewind(0)
    start = time.perf_counter()
    logits = fill(runner, prompt, chunk)
    return time.perf_counter() - start, logits


def measure_depth(runner: Runner, prompt: np.ndarray, plan: DepthPlan, on_step=lambda: None) -> Samples:
    """Samples at depth prompt.shape[1]; ``on_step`` is called after each fill and decode run."""
    depth = prompt.shape[1]
    samples = Samples()
    first_fill_s = None
    if plan.fill is FillMode.SYNTHETIC:
        logits = synthetic_fill(runner, prompt, plan.chunk, plan.synthetic_tokens)
    else:
        first_fill_s, logits = _timed_fill(runner, prompt, plan.chunk)
    on_step()
    for rep in range(plan.warmup + plan.reps):
        runner.rewind(depth)
        start = time.perf_counter()
        greedy_decode(runner, logits, plan.gen)
        if rep >= plan.warmup:
            samples.decode_step_s.append((time.perf_counter() - start) / plan.gen)
        on_step()
    prefill_reps = plan.prefill_reps if plan.time_prefill else 0
    for _ in range(prefill_reps):
        samples.prefill_s.append(_timed_fill(runner, prompt, plan.chunk)[0])
        on_step()
    if not samples.prefill_s and first_fill_s is not None and plan.time_prefill:
        samples.prefill_s.append(first_fill_s)
    runner.rewind(0)
    return samples


def steps_per_depth(plan: DepthPlan) -> int:
    """How many times measure_depth calls on_step."""
    return 1 + plan.warmup + plan.reps + (plan.prefill_reps if plan.time_prefill else 0)


def random_prompt(vocab_size: int, batch: int, length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, (batch, length), dtype=np.int64)
