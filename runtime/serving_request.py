"""One request of a continuously batched server: its tokens, sampler, stopper and where it stands.

All per-request state lives here, never in the engine or the scheduler, so a request can move between
cache rows (kvc.runtime.scheduler packs the busy rows) without anything else noticing. The scheduler
thread is the only one that steps a request; other threads may only ``cancel()`` it and read its
events, which arrive through the ``sink`` callback in order, the last one carrying ``end``.
"""
from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from kvc.runtime.detokenize import IncrementalDetokenizer
from kvc.runtime.sampling import Sampler, SamplingParams
from kvc.runtime.stopping import FinishReason, SequenceStopper


class EndReason(str, enum.Enum):
    STOP = "stop"  # stop string or stop token id
    EOS = "eos"
    LENGTH = "length"  # max_new_tokens or the KV capacity
    TIMEOUT = "timeout"  # the per-request deadline passed (in the queue or while generating)
    CANCELLED = "cancelled"  # the client went away
    ERROR = "error"  # the engine failed; the message is in the event


_FROM_FINISH = {FinishReason.STOP: EndReason.STOP, FinishReason.EOS: EndReason.EOS,
                FinishReason.LENGTH: EndReason.LENGTH}


@dataclass(frozen=True)
class RequestEvent:
    text: str  # newly streamable text (may be empty)
    end: EndReason | None = None  # set on the request's last event only
    message: str = ""  # why, for TIMEOUT / ERROR / CANCELLED


EventSink = Callable[[RequestEvent], None]


class ServingRequest:
    def __init__(self, prompt_ids: Sequence[int], params: SamplingParams, eos_token_ids: Sequence[int],
                 tokenizer, sink: EventSink, timeout_s: float | None = None):
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.params = params
        self.sink = sink
        self.sampler = Sampler(params, 1)  # seeded from (seed, 0): the same draws as a run alone
        detok = IncrementalDetokenizer(tokenizer, self.prompt_ids) if tokenizer is not None else None
        self.stopper = SequenceStopper(params, eos_token_ids, detok)
        self.history = list(self.prompt_ids)  # prompt + generated, for the repetition penalty
        self.generated: list[int] = []  # tokens counted as completion tokens (stop/EOS tokens excluded)
        self.cached = 0  # tokens of this request held in its cache row
        self.prefix_tokens = 0  # prompt tokens served from the shared prefix store
        self.row: int | None = None
        self.pending_token: int | None = None  # sampled, not yet fed to the engine
        self.end: EndReason | None = None
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.deadline = None if timeout_s is None else self.submitted_at + timeout_s
        self._cancelled = threading.Event()

    # --- called from any thread ---
    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # --- called by the scheduler thread only ---
    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline

    def accept_logits(self, logits: np.ndarray, capacity: int) -> None:
        """Sample the next token from this request's logits [vocab] and emit its text; ends the request
        when a stop rule fires or the cache has no slot for the token."""
        token = int(self.sampler.sample(logits[None, :], [self.history])[0])
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        out = self.stopper.step(token, at_capacity=self.cached + 1 > capacity)
        if out.finish_reason not in (FinishReason.STOP, FinishReason.EOS):
            self.generated.append(token)
        self.history.append(token)
        if out.finish_reason is not None:
            self.finish(_FROM_FINISH[out.finish_reason], out.text)
            return
        self.pending_token = token
        if out.text:
            self.sink(RequestEvent(out.text))

    def finish(self, reason: EndReason, text: str = "", message: str = "") -> None:
        if self.end is not None:
            return
        self.end = reason
        self.pending_token = None
        self.sink(RequestEvent(text, reason, message))
