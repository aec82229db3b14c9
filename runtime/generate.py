"""The prefill/decode loop over any Engine: batched, streaming, with per-sequence stop rules.

A request of B prompts uses cache rows 0..B-1. Prefill right-pads the prompts to the longest
one and runs them in one call; each row's padding is written to the ring but stays invisible
(causality) and is overwritten by that row's next decode step, because each row keeps its own
``past_len``. Decode then runs one token per row per call.

Each row tracks its true length (tokens held so far, the RoPE position of its next token)
separately from the storage index passed to the graph as ``past_len``: they are equal until the
ring is full; after that ``kvc.runtime.ring_slots.storage_index`` chooses the slot a token
overwrites, which is how ``Overflow(SLIDE, sink_tokens=n)`` keeps the first n tokens pinned.
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from kvc.errors import GenerationError
from kvc.runtime.detokenize import IncrementalDetokenizer
from kvc.runtime.engine import Engine, check_token_ids
from kvc.runtime.ring_slots import storage_index
from kvc.runtime.sampling import Sampler, SamplingParams
from kvc.runtime.stopping import FinishReason, SequenceStopper


class OverflowPolicy(str, Enum):
    REFUSE = "refuse"  # prompt over capacity is refused; generation stops at capacity ("length")
    SLIDE = "slide"  # keep going: the ring wraps and attention becomes a sliding window of the capacity


@dataclass(frozen=True)
class Overflow:
    """What happens when a sequence outgrows the KV-cache capacity C.

    ``sink_tokens`` = n > 0 (SLIDE only): attention sinks. Once the ring is full, every token sees
    the first n tokens of the sequence plus the most recent C - n (itself included) instead of
    the last C. Keys keep the rotary positions they were written at (true positions, no
    re-rotation): window attention with sinks over absolute positions, unlike StreamingLLM's
    positions relative to the cache.
    """
    policy: OverflowPolicy = OverflowPolicy.REFUSE
    sink_tokens: int = 0

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "policy", OverflowPolicy(self.policy))
        except ValueError:
            choices = ", ".join(p.value for p in OverflowPolicy)
            raise GenerationError(f"overflow policy must be one of {choices}, got {self.policy!r}") from None
        if isinstance(self.sink_tokens, bool) or not isinstance(self.sink_tokens, (int, np.integer)):
            raise GenerationError(f"sink_tokens must be an integer, got {self.sink_tokens!r}")
        object.__setattr__(self, "sink_tokens", int(self.sink_tokens))
        if self.sink_tokens < 0:
            raise GenerationError(f"sink_tokens must be >= 0, got {self.sink_tokens}; "
                                  "use 0 for a plain sliding window")
        if self.sink_tokens > 0 and self.policy is not OverflowPolicy.SLIDE:
            raise GenerationError(f"sink_tokens={self.sink_tokens} needs the slide policy: sinks only apply "
                                  "with --on-overflow slide (OverflowPolicy.SLIDE)")

    @classmethod
    def of(cls, value: "Overflow | OverflowPolicy") -> "Overflow":
        """Accept a bare OverflowPolicy (the older API) as Overflow(policy)."""
        if isinstance(value, Overflow):
            return value
        if isinstance(value, OverflowPolicy):
            return cls(value)
        raise GenerationError(f"overflow must be an Overflow or an OverflowPolicy, got {value!r}")

    def check_fits(self, capacity: int, sliding_window: int | None) -> None:
        """Errors that depend on the compiled cache: at least one ring slot, no narrower model window."""
        if self.sink_tokens == 0:
            return
        if self.sink_tokens >= capacity:
            raise GenerationError(f"sink_tokens={self.sink_tokens} leaves no ring slot in the KV-cache capacity "
                                  f"of {capacity}; use at most {capacity - 1} sink tokens or recompile with a "
                                  "larger --max-seq-len")
        if sliding_window is not None and sliding_window < capacity:
            raise GenerationError(f"attention sinks need full attention over the cache, but this model has its own "
                                  f"sliding window of {sliding_window} tokens (< capacity {capacity}), which "
                                  "already bounds attention; use --on-overflow slide without --sink-tokens")


@dataclass
class GenerationStats:
    """One row's counts (its prompt, its tokens, its cache) and the batch's shared timings: rows of one
    request run in the same engine calls, so prefill_s, decode_s and time_to_first_token_s are the
    batch's (``batch_rows`` says how many rows shared them)."""
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0  # shared by the batch
    decode_s: float = 0.0  # shared by the batch
    time_to_first_token_s: float = 0.0  # shared by the batch
    prefix_cache_tokens: int = 0  # prompt tokens served from the prefix cache
    kv_bytes_in_use: int = 0
    batch_rows: int = 1

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(self.generated_tokens - 1, 0)  # the first token comes from prefill
        return steps / self.decode_s if self.decode_s else 0.0

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens,
                "prefill_s": self.prefill_s, "decode_s": self.decode_s,
                "prefill_tokens_per_s": self.prefill_tokens_per_s, "decode_tokens_per_s": self.decode_tokens_per_s,
                "time_to_first_token_s": self.time_to_first_token_s,
                "prefix_cache_tokens": self.prefix_cache_tokens, "kv_bytes_in_use": self.kv_bytes_in_use,
                "batch_rows": self.batch_rows, "timings_shared_by_batch": self.batch_rows > 1}


@dataclass
class _Timings:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    time_to_first_token_s: float = 0.0


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    stats: GenerationStats = field(default_factory=GenerationStats)

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason.value,
                "stats": self.stats.to_dict()}


@dataclass(frozen=True)
class TextEvent:
    row: int
    text: str
    finish_reason: FinishReason | None


@dataclass(frozen=True)
class PrefixHit:
    """Cache slots of a prompt prefix to reuse: per cache tensor, [kv_heads, length, ...]."""
    length: int
    slots: list[np.ndarray]


class GenerationRun:
    """One request: owns the per-row state and yields TextEvents as tokens are generated.

    Request row r starts in engine row r. When a row finishes, the last active engine row's cache
    slots move into its place, so decode steps run only the active rows (engine rows 0..n-1);
    ``order[i]`` is the request row held by engine row i.
    """

    def __init__(self, engine: Engine, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 eos_token_ids: Sequence[int], tokenizer=None, overflow: Overflow | OverflowPolicy = Overflow(),
                 prefix: PrefixHit | None = None, bytes_per_token: int = 0, sliding_window: int | None = None,
                 max_positions: int | None = None):
        """``sliding_window``: the model's own (narrowest) window (manifest.cache.narrowest_window), for checking
        sinks; ``max_positions``: the model's max_position_embeddings (default: the engine's)."""
        self.engine, self.params, self.overflow = engine, params, Overflow.of(overflow)
        self.sliding_window = sliding_window
        self.max_positions = max_positions if max_positions is not None else engine.max_positions
        self.prompts = [list(map(int, p)) for p in prompts]
        self._check_request()
        self.prefix = prefix
        self.bytes_per_token = bytes_per_token
        self.samplers = [Sampler(params, 1, first_sequence_index=r) for r in range(len(self.prompts))]
        self.history = [list(p) for p in self.prompts]
        self.generated: list[list[int]] = [[] for _ in self.prompts]
        self.stoppers = [SequenceStopper(params, eos_token_ids,
                                         IncrementalDetokenizer(tokenizer, p) if tokenizer is not None else None)
                         for p in self.prompts]
        # true length of each request row (tokens held; the RoPE position of its next token), not capped
        # at C; the storage index the graph gets as past_len is derived from it (_storage)
        self.seq_len = np.zeros(len(self.prompts), dtype=np.int64)
        self.order = list(range(len(self.prompts)))
        self.timings = _Timings()
        self.swaps = 0  # cache rows moved to keep active rows in front

    def _check_request(self) -> None:
        if not self.prompts or any(len(p) == 0 for p in self.prompts):
            raise GenerationError("every prompt needs at least one token (add a BOS token or some text)")
        if len(self.prompts) > self.engine.max_batch:
            raise GenerationError(f"{len(self.prompts)} prompts exceed max_batch={self.engine.max_batch} "
                                  "set when the model was loaded; load with a larger max_batch")
        for p in self.prompts:
            check_token_ids(p, self.engine.vocab_size)
        self.overflow.check_fits(self.engine.capacity, self.sliding_window)
        longest = max(len(p) for p in self.prompts)
        if longest > self.max_positions:
            raise GenerationError(f"prompt of {longest} tokens exceeds the model's {self.max_positions} positions "
                                  "(max_position_embeddings), even with --on-overflow slide; shorten the prompt")
        if longest > self.engine.capacity and self.overflow.policy is OverflowPolicy.REFUSE:
            raise GenerationError(f"prompt of {longest} tokens exceeds the KV-cache capacity of "
                                  f"{self.engine.capacity}; recompile with a larger --max-seq-len, shorten "
                                  "the prompt, or pass --on-overflow slide")
        if longest > self.engine.capacity and len(self.prompts) > 1:
            raise GenerationError("prompts over capacity can only slide one at a time (batch of 1)")

    def _at_limit(self, row: int) -> bool:
        """No room for another token: the ring is full (refuse policy) or the next position would reach the
        model's max_position_embeddings (any policy; learned position tables end there)."""
        after = int(self.seq_len[row]) + 1
        return after > self.max_positions or (self.overflow.policy is OverflowPolicy.REFUSE
                                              and after > self.engine.capacity)

    def events(self) -> Iterator[TextEvent]:
        start = time.perf_counter()
        last_logits = self._prefill()  # [n, V] in engine-row order
        self.timings.prefill_s = time.perf_counter() - start
        first = True
        decode_start = time.perf_counter()
        while self.order:
            tokens = self._sample(last_logits)
            if first:
                self.timings.time_to_first_token_s = time.perf_counter() - start
                first = False
            finished = []
            for row, token in zip(self.order, tokens):
                out = self.stoppers[row].step(token, at_capacity=self._at_limit(row))
                if out.finish_reason not in (FinishReason.STOP, FinishReason.EOS):
                    self.generated[row].append(token)
                self.history[row].append(token)
                if out.text or out.finish_reason is not None:
                    yield TextEvent(row, out.text, out.finish_reason)
                if out.finish_reason is not None:
                    finished.append(row)
            tokens = self._retire(finished, tokens)
            if not self.order:
                break
            last_logits = self._decode(np.array(tokens, dtype=np.int64))
        self.timings.decode_s = time.perf_counter() - decode_start

    def _sample(self, logits: np.ndarray) -> list[int]:
        return [int(self.samplers[row].sample(logits[i: i + 1], [self.history[row]])[0])
                for i, row in enumerate(self.order)]

    def _retire(self, finished: list[int], tokens: list[int]) -> list[int]:
        """Drop finished rows from the engine batch: move the last active row's slots into each finished
        one's engine row (one row's live slots copied), so the next step runs only active rows."""
        for row in finished:
            i, last = self.order.index(row), len(self.order) - 1
            if i != last:
                moved = self.order[last]
                live = min(int(self.seq_len[moved]), self.engine.capacity)
                self.engine.write_slots(i, self.engine.read_slots(last, live))
                self.order[i], tokens[i] = moved, tokens[last]
                self.swaps += 1
            self.order.pop()
            tokens.pop()
        return tokens

    def _storage(self) -> np.ndarray:
        """past_len for the graph, engine-row order: where each row's next token is stored (see ring_slots)."""
        return storage_index(self.seq_len[self.order], self.engine.capacity, self.overflow.sink_tokens)

    def _forward(self, ids: np.ndarray) -> np.ndarray:
        """Run ids [n, S] (engine-row order) at each row's true positions; multi-token calls must stay below
        capacity."""
        width = ids.shape[1]
        held = self.seq_len[self.order]
        if width > 1 and int(held.max()) + width > self.engine.capacity:  # a bug here, not bad input
            raise RuntimeError(f"a {width}-token call after {int(held.max())} tokens would cross the "
                               f"ring's capacity {self.engine.capacity}; such steps must run one token per call")
        positions = held[:, None] + np.arange(width, dtype=np.int64)[None, :]
        return self.engine.forward(ids, positions, self._storage())

    def _prefill(self) -> np.ndarray:
        """Run all prompt tokens; return each row's logits at its last prompt token [B, V]."""
        self.engine.release_slots()  # this run rewrites every row it uses from slot 0
        start = 0
        if self.prefix is not None:
            for row in range(len(self.prompts)):
                self.engine.write_slots(row, self.prefix.slots)
            start = self.prefix.length
            self.seq_len[:] = start
        remaining = [p[start:] for p in self.prompts]
        if len(remaining) == 1 and start + len(remaining[0]) > self.engine.capacity:
            return self._prefill_sliding(remaining[0])
        # batches: every prompt fits (_check_request), so start + width <= capacity
        lengths = np.array([len(r) for r in remaining], dtype=np.int64)
        width = int(lengths.max())
        ids = np.zeros((len(remaining), width), dtype=np.int64)
        for row, r in enumerate(remaining):
            ids[row, : len(r)] = r
        logits = self._forward(ids)
        self.seq_len += lengths
        return logits[np.arange(len(remaining)), lengths - 1]

    def _prefill_sliding(self, tokens: list[int]) -> np.ndarray:
        """A prompt that overflows the ring (slide policy, one row): fill the ring up to capacity in one
        call (after any prefix-cache hit), then one token per call, so that no chunk crosses capacity
        and every query sees exactly what single-token decoding would show it."""
        head = self.engine.capacity - int(self.seq_len[0])
        logits = self._forward(np.array([tokens[:head]], dtype=np.int64))
        self.seq_len += head
        for token in tokens[head:]:
            logits = self._forward(np.array([[token]], dtype=np.int64))
            self.seq_len += 1
        return logits[:, -1]

    def _decode(self, tokens: np.ndarray) -> np.ndarray:
        logits = self._forward(tokens[:, None])
        self.seq_len[self.order] += 1
        return logits[:, -1]

    @property
    def stats(self) -> GenerationStats:
        """Totals over the rows (what a single-prompt run reports)."""
        rows = [self.row_stats(r) for r in range(len(self.prompts))]
        total = rows[0]
        for other in rows[1:]:
            total.prompt_tokens += other.prompt_tokens
            total.generated_tokens += other.generated_tokens
            total.prefix_cache_tokens += other.prefix_cache_tokens
            total.kv_bytes_in_use += other.kv_bytes_in_use
        return total

    def row_stats(self, row: int) -> GenerationStats:
        t = self.timings
        return GenerationStats(prompt_tokens=len(self.prompts[row]), generated_tokens=len(self.generated[row]),
                               prefill_s=t.prefill_s, decode_s=t.decode_s,
                               time_to_first_token_s=t.time_to_first_token_s,
                               prefix_cache_tokens=self.prefix.length if self.prefix is not None else 0,
                               kv_bytes_in_use=min(int(self.seq_len[row]), self.engine.capacity)
                               * self.bytes_per_token, batch_rows=len(self.prompts))

    def results(self) -> list[GenerationResult]:
        return [GenerationResult(s.text, g, s.finish_reason, self.row_stats(r))
                for r, (s, g) in enumerate(zip(self.stoppers, self.generated))]
