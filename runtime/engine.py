"""The engine interface every backend (ONNX Runtime, TVM) implements for the runtime.

One call runs the graph on ``input_ids [B, S]`` at RoPE ``position_ids [B, S]`` for sequences
that already hold ``past_len [B]`` tokens in rows 0..B-1 of the ring-buffer caches; the caches
are updated in place and the logits [B, S, vocab] returned. Prefill and decode are the same
call with S > 1 and S == 1 (an engine may dispatch them to separate compiled functions).
"""
from __future__ import annotations

from typing import Protocol

import numpy as np


class Engine(Protocol):
    capacity: int  # ring-buffer slots per sequence
    max_batch: int  # rows allocated at load
    vocab_size: int

    def forward(self, input_ids: np.ndarray, position_ids: np.ndarray, past_len: np.ndarray) -> np.ndarray:
        ...

    def read_slots(self, row: int, length: int) -> list[np.ndarray]:
        """Copy out the first ``length`` slots of every cache tensor of ``row`` (prefix cache)."""
        ...

    def write_slots(self, row: int, tensors: list[np.ndarray]) -> None:
        """Write tensors from ``read_slots`` into the first slots of ``row``."""
        ...

    def cache_nbytes(self) -> int:
        """Bytes of all cache tensors allocated (all rows)."""
        ...


def check_step_inputs(engine: Engine, input_ids: np.ndarray, position_ids: np.ndarray, past_len: np.ndarray) -> None:
    """Shape/dtype checks shared by engines: wrong inputs must fail loudly, not corrupt caches."""
    if input_ids.ndim != 2 or input_ids.shape != position_ids.shape:
        raise ValueError(f"input_ids {input_ids.shape} and position_ids {position_ids.shape} must both be [B, S]")
    batch = input_ids.shape[0]
    if past_len.shape != (batch,):
        raise ValueError(f"past_len must be [{batch}], got {past_len.shape}")
    if batch > engine.max_batch:
        raise ValueError(f"batch {batch} exceeds the {engine.max_batch} rows allocated at load (max_batch)")
    if input_ids.shape[1] > engine.capacity:
        raise ValueError(f"{input_ids.shape[1]} tokens in one call exceed the cache capacity {engine.capacity}")
