"""Bytes a decode step must move, and the machine's measured memory bandwidth to compare them with.

Decode is bound by memory bandwidth: each step reads every weight the step uses once (for the
whole batch) and, per row, the live KV cache written so far (never the compiled capacity) in its
stored dtype, scales included. Those bytes over what a plain large memory copy achieves on this
machine (measured in the same run) are the floor step time, the roofline; the floor over the
measured step time is the fraction of the bandwidth an engine reaches.
"""
from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from kvc.contract import KvDtype, WeightDtype
from kvc.models.config import Family, ModelConfig

PER_TOKEN_SCALE_BYTES = 4  # int8 / dynamic fp8: one float32 scale per token per kv head, K and V each


SCALE_BYTES = 4  # one float32 scale per block of quantized weights


def stored_bytes_per_weight(weights: WeightDtype = WeightDtype.FP32, block: int = 32) -> float:
    """Bytes one weight takes as stored: its code plus its share of the block's scale (int8/int4)."""
    return weights.bits / 8 + (SCALE_BYTES / block if weights.quantized else 0.0)


def weight_bytes_per_token(config: ModelConfig, bytes_per_weight: float = 4, weights: WeightDtype | None = None,
                           block: int = 32) -> int:
    """Weight bytes one decode step reads: every parameter, except that the input embedding
    table (and GPT-2's position table) contribute only the one gathered row. A tied table is
    still read whole, as the LM head. ``weights`` (kvc compile --weights) overrides bytes_per_weight
    with the stored size (symmetric scales; norms and biases are counted at that size too)."""
    if weights is not None:
        bytes_per_weight = stored_bytes_per_weight(weights, block)
    h = config.hidden_size
    gathered_only = 0 if config.tie_word_embeddings else (config.vocab_size - 1) * h
    if config.family is Family.GPT2:
        gathered_only += (config.max_position_embeddings - 1) * h
    return int((config.num_parameters() - gathered_only) * bytes_per_weight)


def kv_bytes_per_cached_token(config: ModelConfig, kv_dtype: str, per_token_scales: bool) -> float:
    """Cache bytes one token occupies: K and V, all layers and kv heads, plus their scales."""
    scale = PER_TOKEN_SCALE_BYTES if per_token_scales else 0
    per_head_vector = config.resolved_head_dim * KvDtype(kv_dtype).bytes_per_element + scale
    return 2 * config.num_layers * config.num_kv_heads * per_head_vector


def has_per_token_scales(kv_dtype: str, static_fp8_scales: bool = False) -> bool:
    return kv_dtype == "int8" or (kv_dtype == "fp8" and not static_fp8_scales)


def mean_attended_tokens(depth: int, gen: int) -> float:
    """Timed step i (0-based) after a fill of ``depth`` tokens attends depth + i + 1 tokens."""
    return depth + (gen + 1) / 2


def decode_bytes_per_step(config: ModelConfig, kv_dtype: str, attended_tokens: float, batch: int = 1,
                          per_token_scales: bool | None = None) -> float:
    """Bytes one decode step (one new token per sequence) must read: the weights once for the
    whole batch, plus each sequence's cache at ``attended_tokens``."""
    if per_token_scales is None:
        per_token_scales = has_per_token_scales(kv_dtype)
    kv = kv_bytes_per_cached_token(config, kv_dtype, per_token_scales)
    return weight_bytes_per_token(config) + batch * attended_tokens * kv


@dataclass(frozen=True)
class Roofline:
    """The floor of one engine's decode step: bytes per step over the measured bandwidth."""

    weight_bytes: int  # read once per step, whatever the batch
    kv_bytes_per_token: int  # one row's stored K/V bytes per cached token, scales included
    bandwidth: float  # measured bytes/s

    def bytes_per_step(self, attended_tokens: float, batch: int) -> float:
        return self.weight_bytes + batch * attended_tokens * self.kv_bytes_per_token

    def floor_s(self, attended_tokens: float, batch: int) -> float:
        return self.bytes_per_step(attended_tokens, batch) / self.bandwidth


def measure_bandwidth(nbytes: int = 1 << 30, repeats: int = 5, threads: int = 1) -> float:
    """Bytes/s of a large array copy (bytes read + bytes written over the time), median of
    ``repeats``; ``threads`` copy disjoint slices at once (numpy releases the GIL while copying)."""
    count = max(nbytes // 8, threads)
    src = np.ones(count, dtype=np.float64)
    dst = np.zeros_like(src)  # both written once first so no page fault lands inside the timing
    bounds = np.linspace(0, count, threads + 1, dtype=np.int64)
    slices = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]

    def copy_slice(s: slice) -> None:
        np.copyto(dst[s], src[s])

    samples = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in range(repeats + 1):  # the first copy only warms up
            start = time.perf_counter()
            list(pool.map(copy_slice, slices))
            samples.append(2 * src.nbytes / (time.perf_counter() - start))
    return statistics.median(samples[1:])
