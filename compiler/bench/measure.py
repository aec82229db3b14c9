"""The timing loop, llama-bench style, per context depth d:

* decode (tg @ d): fill an empty cache to depth d with a random prompt once, then per repetition
  rewind to d and time ``gen`` greedy decode steps of one token each; warm-up repetitions first.
* prefill (pp d): time filling an empty cache with the d-token prompt, ``prefill_reps`` times;
  the first fill above is their warm-up. With prefill_reps 0 the first fill is the one sample
  (for engines whose prefill is too slow to repeat).
Rewinding only moves the cache length, so a repetition never pays for another fill."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from kvc.compiler.bench.runners import Runner


@dataclass
class Samples:
    """Per timed repetition: seconds for the whole prefill, seconds per decode step."""

    prefill_s: list[float] = field(default_factory=list)
    decode_step_s: list[float] = field(default_factory=list)


def fill(runner: Runner, prompt: np.ndarray, chunk: int) -> np.ndarray:
    """Prefill ``prompt`` [B, N] after the cached tokens, ``chunk`` tokens per call; last logits."""
    logits = None
    for start in range(0, prompt.shape[1], chunk):
        logits = runner.step(prompt[:, start:start + chunk])
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


def measure_depth(runner: Runner, prompt: np.ndarray, gen: int, reps: int, warmup: int, chunk: int,
                  prefill_reps: int, on_step=lambda: None) -> Samples:
    """Samples at depth prompt.shape[1]; ``on_step`` is called after each fill and decode run."""
    depth = prompt.shape[1]
    samples = Samples()
    first_fill_s, logits = _timed_fill(runner, prompt, chunk)
    on_step()
    for rep in range(warmup + reps):
        runner.rewind(depth)
        start = time.perf_counter()
        greedy_decode(runner, logits, gen)
        if rep >= warmup:
            samples.decode_step_s.append((time.perf_counter() - start) / gen)
        on_step()
    for _ in range(prefill_reps):
        samples.prefill_s.append(_timed_fill(runner, prompt, chunk)[0])
        on_step()
    if not samples.prefill_s:
        samples.prefill_s.append(first_fill_s)
    runner.rewind(0)
    return samples


def steps_per_depth(warmup: int, reps: int, prefill_reps: int) -> int:
    """How many times measure_depth calls on_step."""
    return 1 + warmup + reps + prefill_reps


def random_prompt(vocab_size: int, batch: int, length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, (batch, length), dtype=np.int64)
