"""Next-token selection for a batch of sequences from numpy logits [batch, vocab].

Processors run in Hugging Face's order (repetition penalty, temperature, top-k, top-p, min-p) and follow
its rules, so a kvc run and a transformers run with the same settings sample from the same distribution.
Each sequence owns its random generator, seeded from (seed, index of the sequence in the request): a
batched run draws the same tokens as running each sequence alone, and the same seed repeats a run.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kvc.errors import GenerationError


@dataclass(frozen=True)
class SamplingParams:
    """What to sample and when to stop. temperature 0 is greedy; top_k 0, top_p 1, min_p 0 and
    repetition_penalty 1 switch that processor off; seed None draws fresh entropy."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 256
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        # One string / one id means that one stop (tuple("stop") would be four one-letter stops); lists are
        # accepted for convenience; stored as tuples so the params stay hashable and immutable.
        object.__setattr__(self, "stop_strings", _as_tuple("stop_strings", self.stop_strings, str))
        object.__setattr__(self, "stop_token_ids", _as_tuple("stop_token_ids", self.stop_token_ids, (int, np.integer)))
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        _check_real("temperature", self.temperature, self.temperature == 0.0 or self.temperature >= MIN_TEMPERATURE,
                    f"must be 0 (greedy) or >= {MIN_TEMPERATURE} (smaller values overflow the scaled logits)")
        _check_int("top_k", self.top_k, self.top_k >= 0, "must be >= 0 (0 switches top-k off)")
        _check_real("top_p", self.top_p, 0.0 < self.top_p <= 1.0, "must be in (0, 1] (1 switches top-p off)")
        _check_real("min_p", self.min_p, 0.0 <= self.min_p < 1.0, "must be in [0, 1) (0 switches min-p off)")
        _check_real(
            "repetition_penalty", self.repetition_penalty, self.repetition_penalty > 0.0,
            "must be > 0 (1 switches the penalty off)",
        )
        _check_int("max_new_tokens", self.max_new_tokens, self.max_new_tokens >= 1, "must be >= 1")
        if self.seed is not None:
            _check_int("seed", self.seed, self.seed >= 0, "must be a non-negative integer or None")
        if not isinstance(self.ignore_eos, bool):
            raise GenerationError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        for text in self.stop_strings:
            if not isinstance(text, str) or not text:
                raise GenerationError(f"stop_strings must be non-empty strings, got {text!r}")
        for token_id in self.stop_token_ids:
            _check_int("stop_token_ids", token_id, token_id >= 0, "must hold non-negative token ids")


MIN_TEMPERATURE = 1e-4  # logits / T must stay finite in float32 for logits up to ~1e34


def _as_tuple(name: str, value: object, item_type) -> tuple:
    if isinstance(value, item_type):
        return (value,)
    if isinstance(value, (bytes, bytearray)) or not isinstance(value, (list, tuple, set, frozenset)):
        raise GenerationError(f"{name} must be a list, got {type(value).__name__}")
    return tuple(value)


def _check_real(name: str, value: object, ok: bool, rule: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok:
        raise GenerationError(f"{name}={value!r} is invalid: {rule}")


def _check_int(name: str, value: object, ok: bool, rule: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not ok:
        raise GenerationError(f"{name}={value!r} is invalid: {rule}")


# ---- logits processors: [B, V] float32 in, [B, V] float32 out, filtered tokens set to -inf ----


def apply_repetition_penalty(logits: np.ndarray, token_history: Sequence[Sequence[int]], penalty: float) -> np.ndarray:
    """CTRL rule: tokens already seen get positive logits divided and negative ones multiplied by the penalty."""
    out = logits.copy()
    for row, history in enumerate(token_history):
        seen = np.unique(np.asarray(history, dtype=np.int64))
        if seen.size == 0:
            continue
        values = out[row, seen]
        out[row, seen] = np.where(values < 0, values * penalty, values / penalty)
    return out


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    return (logits / np.float32(temperature)).astype(np.float32)


def apply_top_k(logits: np.ndarray, top_k: int) -> np.ndarray:
    """Keep tokens whose logit is at least the k-th largest (ties at the boundary all survive, as in HF)."""
    k = min(top_k, logits.shape[-1])
    kth_largest = -np.partition(-logits, k - 1, axis=-1)[:, k - 1 : k]
    return np.where(logits < kth_largest, -np.inf, logits).astype(np.float32)


def apply_top_p(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the most likely tokens whose mass reaches top_p: drop a token when the mass of it and all less
    likely tokens is <= 1 - top_p; the most likely token always survives."""
    order = np.argsort(logits, axis=-1, kind="stable")  # ascending
    ascending_probs = _softmax(np.take_along_axis(logits, order, axis=-1))
    drop_sorted = np.cumsum(ascending_probs, axis=-1) <= 1.0 - top_p
    drop_sorted[:, -1] = False
    drop = np.empty_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, axis=-1)
    return np.where(drop, -np.inf, logits).astype(np.float32)


def apply_min_p(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Drop tokens less likely than min_p times the most likely token's probability."""
    probs = _softmax(logits)
    drop = probs < min_p * probs.max(axis=-1, keepdims=True)
    drop[np.arange(len(drop)), probs.argmax(axis=-1)] = False
    return np.where(drop, -np.inf, logits).astype(np.float32)


def process_logits(logits: np.ndarray, token_history: Sequence[Sequence[int]], params: SamplingParams) -> np.ndarray:
    """All enabled processors in HF order; greedy runs only the repetition penalty (the rest keep the argmax)."""
    out = np.asarray(logits, dtype=np.float32)
    if params.repetition_penalty != 1.0:
        out = apply_repetition_penalty(out, token_history, params.repetition_penalty)
    if params.greedy:
        return out
    if params.temperature != 1.0:
        out = apply_temperature(out, params.temperature)
    if params.top_k > 0:
        out = apply_top_k(out, params.top_k)
    if params.top_p < 1.0:
        out = apply_top_p(out, params.top_p)
    if params.min_p > 0.0:
        out = apply_min_p(out, params.min_p)
    return out


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax in float64 so sampling thresholds and cumulative sums do not lose mass to rounding."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def sampling_probs(logits: np.ndarray, token_history: Sequence[Sequence[int]], params: SamplingParams) -> np.ndarray:
    """The float64 distribution [B, V] that Sampler draws from (not meaningful for greedy params)."""
    return _softmax(process_logits(logits, token_history, params))


class Sampler:
    """Draws one token per sequence per step; row i always uses the generator seeded from (seed, i)."""

    def __init__(self, params: SamplingParams, batch_size: int, first_sequence_index: int = 0):
        if batch_size < 1:
            raise GenerationError(f"batch_size={batch_size} is invalid: must be >= 1")
        self.params = params
        self.batch_size = batch_size
        indices = range(first_sequence_index, first_sequence_index + batch_size)
        self._generators = [_sequence_generator(params.seed, i) for i in indices]

    def sample(self, logits: np.ndarray, token_history: Sequence[Sequence[int]]) -> np.ndarray:
        """logits [B, V] float; token_history[b] = prompt + generated ids of row b. Returns int64 [B]."""
        logits = np.asarray(logits)
        if logits.ndim != 2 or logits.shape[0] != self.batch_size or len(token_history) != self.batch_size:
            raise ValueError(
                f"expected logits [{self.batch_size}, vocab] and {self.batch_size} histories, "
                f"got logits {logits.shape} and {len(token_history)} histories"
            )
        processed = process_logits(logits, token_history, self.params)
        if self.params.greedy:
            return np.argmax(processed, axis=-1).astype(np.int64)  # first maximum = lowest id, as torch.argmax
        probs = _softmax(processed)
        if not np.isfinite(probs).all():
            raise GenerationError("the sampling distribution is not finite (the model produced NaN/inf logits or "
                                  "the settings overflowed); use other sampling values or greedy decoding")
        vocab = probs.shape[-1]
        return np.array([rng.choice(vocab, p=row) for rng, row in zip(self._generators, probs)], dtype=np.int64)


def _sequence_generator(seed: int | None, sequence_index: int) -> np.random.Generator:
    if seed is None:
        return np.random.default_rng()
    return np.random.default_rng(np.random.SeedSequence([seed, sequence_index]))
