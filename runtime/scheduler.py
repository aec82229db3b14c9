"""Continuous (iteration-level) batching: one thread owns the engine, requests reach it through a queue.

Each iteration of the scheduler thread:
  1. takes new requests from the inbox into the waiting line (bounded: ``submit`` raises QueueFull),
  2. ends cancelled and timed-out requests, freeing their rows at once,
  3. admits the oldest waiting request into the prefill row when a decode row is free, writing the
     longest shared prompt prefix from the PrefixStore so only the rest is prefilled,
  4. runs one prefill chunk (at most ``prefill_chunk`` tokens) of that request, alone (B=1),
  5. runs one decode step over the busy rows (kvc.runtime.batch_rows explains the row layout).
So a long prompt delays the running requests' next tokens by one chunk per step, not by its whole
prefill, and a request's row is free for the next one the step after it ends.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kvc.errors import GenerationError, KvcError
from kvc.runtime.batch_rows import PREFILL_ROW, DecodeBatch, RowTable
from kvc.runtime.prefix_store import PrefixStore
from kvc.runtime.sampling import SamplingParams
from kvc.runtime.scheduler_stats import SchedulerStats
from kvc.runtime.serving_request import EndReason, EventSink, ServingRequest

log = logging.getLogger(__name__)


class QueueFull(KvcError):
    """The waiting line is full: the client should retry later."""


class SchedulerClosed(KvcError):
    """The scheduler was shut down."""


class PromptTooLong(GenerationError):
    """The prompt does not fit the KV-cache capacity."""


@dataclass(frozen=True)
class SchedulerOptions:
    max_queue: int = 64  # requests waiting for a row; more are refused (QueueFull)
    prefill_chunk: int = 128  # prompt tokens per prefill call between decode steps
    prefix_cache_tokens: int = 8192  # prompt tokens whose KV is kept for reuse (0: off)
    min_prefix_match: int = 4  # shortest shared prefix worth copying instead of recomputing
    compact: bool = True  # keep decode rows packed (see kvc.runtime.batch_rows)
    idle_wait_s: float = 0.05  # how long the idle thread blocks on the inbox before rechecking

    def __post_init__(self) -> None:
        for name in ("max_queue", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise GenerationError(f"{name} must be >= 1, got {getattr(self, name)}")


class Scheduler:
    def __init__(self, model, options: SchedulerOptions = SchedulerOptions()):
        """``model``: a KvcModel loaded with max_batch = decode rows + 1 (row 0 prefills)."""
        self.model, self.options = model, options
        self.engine = model.engine
        self.capacity = self.engine.capacity
        self.rows = RowTable(self.engine, options.compact)
        self.prefix = PrefixStore(options.prefix_cache_tokens, options.min_prefix_match)
        self.stats = SchedulerStats(self.rows.decode_rows, self.capacity)
        self._inbox: queue.SimpleQueue[ServingRequest | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0  # submitted, not yet admitted to the prefill row
        self._closed = False
        self._waiting: deque[ServingRequest] = deque()
        self._prefilling: ServingRequest | None = None
        self._thread = threading.Thread(target=self._run, name="kvc-scheduler", daemon=True)

    # --- any thread ---
    def start(self) -> "Scheduler":
        """Take the model for this scheduler's lifetime (its thread drives the engine's rows directly, so
        the model's own generate() must not run meanwhile), then start the thread."""
        self.model.reserve("kvc serve's scheduler")
        try:
            self._thread.start()
        except BaseException:
            self.model.release()
            raise
        return self

    def close(self, timeout_s: float = 10.0) -> None:
        with self._lock:
            self._closed = True
        self._inbox.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    def new_request(self, prompt_ids: Sequence[int], params: SamplingParams, sink: EventSink,
                    timeout_s: float | None = None) -> ServingRequest:
        """A request checked against this model (ids in the vocabulary, prompt within capacity)."""
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise GenerationError("the prompt needs at least one token")
        vocab = self.engine.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise GenerationError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if len(ids) > self.capacity:
            raise PromptTooLong(f"prompt of {len(ids)} tokens exceeds this model's KV-cache capacity of "
                                f"{self.capacity} tokens; shorten it")
        return ServingRequest(ids, params, self.model.eos_token_ids, self.model.tokenizer, sink, timeout_s)

    def submit(self, request: ServingRequest) -> None:
        with self._lock:
            if self._closed:
                raise SchedulerClosed("the server is shutting down")
            if self._pending >= self.options.max_queue:
                raise QueueFull(f"{self._pending} requests are already waiting (max_queue="
                                f"{self.options.max_queue}); retry later")
            self._pending += 1
            self.stats.update(queue_depth=self._pending)
        self._inbox.put(request)

    # --- the scheduler thread ---
    def _run(self) -> None:
        try:
            while not self._closed:
                self._take_inbox(block=not self._has_work())
                self._end_dropped(time.monotonic())
                self._admit()
                try:
                    self._step()
                except Exception as exc:  # the engine failed: end what ran, keep serving the rest
                    log.exception("engine step failed")
                    self._fail_active(f"the engine failed: {exc}")
                self._publish()
            self._fail_all("the server is shutting down")
        finally:
            self.model.release()

    def _has_work(self) -> bool:
        return bool(self._waiting or self._prefilling or self.rows.busy())

    def _take_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=self.options.idle_wait_s) if block else self._inbox.get_nowait()
            while True:
                if item is not None:
                    self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _end_dropped(self, now: float) -> None:
        """Cancelled or expired requests end now, wherever they are; their rows free up for the next."""
        for request in [r for r in self._waiting if _dropped(r, now)]:
            self._waiting.remove(request)
            self._dequeued()
            self._end(request, *_why_dropped(request, "waiting for a free row"))
        if self._prefilling is not None and _dropped(self._prefilling, now):
            request, self._prefilling = self._prefilling, None
            self._end(request, *_why_dropped(request, "in prefill"))
        for request in [r for r in self.rows.busy() if _dropped(r, now)]:
            self._end(request, *_why_dropped(request, "while generating"))

    def _admit(self) -> None:
        if self._prefilling is not None or not self._waiting or self.rows.free() == 0:
            return
        request = self._waiting.popleft()
        self._dequeued()
        request.cached = 0
        match = self.prefix.match(request.prompt_ids)
        if match is not None:
            self.engine.write_slots(PREFILL_ROW, match.slots)
            request.cached = request.prefix_tokens = match.length
        self.stats.add(prompt_tokens=len(request.prompt_ids), prefix_tokens=request.prefix_tokens)
        self._prefilling = request

    def _step(self) -> None:
        if self._prefilling is not None:
            self._prefill_chunk(self._prefilling)
        at = self._prefilling.cached if self._prefilling is not None else 0
        batch = self.rows.decode_batch(prefill_at=at)
        if batch is not None:
            self._decode(batch)

    def _prefill_chunk(self, request: ServingRequest) -> None:
        start = request.cached
        chunk = request.prompt_ids[start: start + self.options.prefill_chunk]
        ids = np.array([chunk], np.int64)
        positions = start + np.arange(len(chunk), dtype=np.int64)[None, :]
        logits = self.engine.forward(ids, positions, np.array([start], np.int64))
        request.cached += len(chunk)
        self.stats.add(prefill_chunks=1)
        if request.cached < len(request.prompt_ids):
            return
        self._prefilling = None
        request.accept_logits(logits[0, -1], self.capacity)
        self.stats.tokens_generated(1)
        slots = self.engine.read_slots(PREFILL_ROW, request.cached)
        self.prefix.put(tuple(request.prompt_ids), slots)
        if request.end is None:
            self.rows.place(request, slots)
        else:
            self._end(request)

    def _decode(self, batch: DecodeBatch) -> None:
        logits = self.engine.forward(batch.input_ids, batch.positions, batch.past_len)[:, -1]
        for _, request in batch.requests:  # all rows advance before any row moves (rows.release)
            request.cached += 1
        for row, request in batch.requests:
            request.accept_logits(logits[row], self.capacity)
        for _, request in batch.requests:
            if request.end is not None:
                self._end(request)
        self.stats.add(decode_steps=1, decode_rows=len(batch.requests))
        self.stats.tokens_generated(len(batch.requests))

    def _end(self, request: ServingRequest, reason: EndReason | None = None, message: str = "",
             free_row: bool = True) -> None:
        """Free the request's row (if any) and count it; ``reason``: end it first (drop, failure)."""
        if reason is not None:
            request.finish(reason, message=message)
        if request.row is not None and free_row:
            self.rows.release(request)
        ttft = None if request.first_token_at is None else request.first_token_at - request.submitted_at
        self.stats.request_ended(request.end.value, ttft)

    def _dequeued(self) -> None:
        with self._lock:
            self._pending -= 1

    def _fail_active(self, message: str) -> None:
        active = self.rows.busy() + ([self._prefilling] if self._prefilling is not None else [])
        self._prefilling = None
        for request in active:  # no slot copies: the engine may be what failed
            self._end(request, EndReason.ERROR, message, free_row=False)
        self.rows.clear()

    def _fail_all(self, message: str) -> None:
        self._take_inbox(block=False)
        self._fail_active(message)
        while self._waiting:
            self._dequeued()
            self._end(self._waiting.popleft(), EndReason.ERROR, message)

    def _publish(self) -> None:
        busy = self.rows.busy()
        in_use = sum(r.cached for r in busy) + (self._prefilling.cached if self._prefilling else 0)
        with self._lock:
            pending = self._pending
        self.stats.update(queue_depth=pending, rows_busy=len(busy), kv_slots_in_use=in_use)


def _dropped(request: ServingRequest, now: float) -> bool:
    return request.cancelled or request.expired(now)


def _why_dropped(request: ServingRequest, where: str) -> tuple[EndReason, str]:
    if request.cancelled:
        return EndReason.CANCELLED, f"cancelled {where}"
    return EndReason.TIMEOUT, f"timed out {where}"
