"""Interleaved timing for the kernel benchmarks (tvm_gemv_layouts.py, tvm_packed_gemv.py): every repetition
measures numpy copy bandwidth, then runs each variant once, so drift of a shared machine hits all alike."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class InterleavedTimes:
    seconds: dict[str, list[float]]  # per variant, one per repetition
    copy_gbs: list[float]  # numpy copy bandwidth (read + write) per repetition

    @property
    def copy_median(self) -> float:
        return statistics.median(self.copy_gbs)


def interleaved_times(variants: dict[str, Callable[[], object]], reps: int) -> InterleavedTimes:
    src = np.ones(64 << 20, np.float32)
    dst = np.empty_like(src)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    copies = []
    for _ in range(reps):
        start = time.perf_counter()
        np.copyto(dst, src)
        copies.append(2 * src.nbytes / (time.perf_counter() - start) / 1e9)
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    return InterleavedTimes(seconds, copies)
