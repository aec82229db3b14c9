"""Counters the scheduler thread updates and any thread may read as a consistent snapshot
(``kvc serve`` renders them as Prometheus text at /metrics)."""
from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
THROUGHPUT_WINDOW_S = 10.0


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # cumulative per bucket, as Prometheus wants
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        self.total += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1


@dataclass(frozen=True)
class StatsSnapshot:
    requests_by_end: dict[str, int]
    queue_depth: int
    rows_busy: int
    rows_total: int
    kv_slots_in_use: int
    kv_slots_total: int
    prompt_tokens: int
    prefix_tokens: int
    generated_tokens: int
    decode_steps: int
    decode_rows: int  # summed over decode steps: mean occupancy = decode_rows / decode_steps
    prefill_chunks: int
    tokens_per_s: float  # generated tokens per second over the last THROUGHPUT_WINDOW_S
    ttft: Histogram


class SchedulerStats:
    def __init__(self, rows_total: int, capacity: int):
        self._lock = threading.Lock()
        self.rows_total, self.capacity = rows_total, capacity
        self.requests_by_end: Counter[str] = Counter()
        self.queue_depth = self.rows_busy = self.kv_slots_in_use = 0
        self.prompt_tokens = self.prefix_tokens = self.generated_tokens = 0
        self.decode_steps = self.decode_rows = self.prefill_chunks = 0
        self.ttft = Histogram(TTFT_BUCKETS_S)
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens generated in a step)

    def update(self, **fields) -> None:
        with self._lock:
            for name, value in fields.items():
                setattr(self, name, value)

    def add(self, **fields) -> None:
        with self._lock:
            for name, value in fields.items():
                setattr(self, name, getattr(self, name) + value)

    def tokens_generated(self, count: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.generated_tokens += count
            self._recent.append((now, count))
            self._trim(now)

    def request_ended(self, end: str, ttft_s: float | None) -> None:
        with self._lock:
            self.requests_by_end[end] += 1
            if ttft_s is not None:
                self.ttft.observe(ttft_s)

    def snapshot(self) -> StatsSnapshot:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            rate = sum(c for _, c in self._recent) / THROUGHPUT_WINDOW_S
            ttft = Histogram(self.ttft.buckets, list(self.ttft.counts), self.ttft.total, self.ttft.count)
            return StatsSnapshot(dict(self.requests_by_end), self.queue_depth, self.rows_busy, self.rows_total,
                                 self.kv_slots_in_use, self.rows_total * self.capacity, self.prompt_tokens,
                                 self.prefix_tokens, self.generated_tokens, self.decode_steps, self.decode_rows,
                                 self.prefill_chunks, rate, ttft)

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - THROUGHPUT_WINDOW_S:
            self._recent.popleft()
