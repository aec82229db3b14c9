"""The engine interface every backend (ONNX Runtime, TVM) implements for the runtime.

One call runs the graph on ``input_ids [B, S]`` at RoPE ``position_ids [B, S]`` for sequences
that already hold ``past_len [B]`` tokens in rows 0..B-1 of the ring-buffer caches; the caches
are updated in place and the logits [B, S, vocab] returned. Prefill and decode are the same
call with S > 1 and S == 1 (an engine may dispatch them to separate compiled functions).
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from kvc.errors import GenerationError


class Engine(Protocol):
    capacity: int  # ring-buffer slots per sequence
    max_batch: int  # rows allocated at load
    vocab_size: int
    max_positions: int  # the model's max_position_embeddings: positions must stay below it

    def forward(self, input_ids: np.ndarray, position_ids: np.ndarray, past_len: np.ndarray) -> np.ndarray:
        ...

    def read_slots(self, row: int, length: int) -> list[np.ndarray]:
        """Copy out the first ``length`` slots of every cache tensor of ``row`` (prefix cache)."""
        ...

    def write_slots(self, row: int, tensors: list[np.ndarray]) -> None:
        """Write tensors from ``read_slots`` into the first slots of ``row``."""
        ...

    def release_slots(self) -> None:
        """A new generation rewrites every row from slot 0: buffers sized to the live context may shrink."""
        ...

    def cache_nbytes(self) -> int:
        """Bytes of all cache tensors allocated (all rows)."""
        ...


def check_step_inputs(engine: Engine, input_ids: np.ndarray, position_ids: np.ndarray, past_len: np.ndarray) -> None:
    """Shape/dtype/range checks shared by engines: wrong inputs must fail loudly, not corrupt caches or
    read out of bounds (a TVM gather with a bad id reads outside the embedding; ORT wraps negative ids)."""
    for name, array in (("input_ids", input_ids), ("position_ids", position_ids), ("past_len", past_len)):
        if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.integer):
            raise GenerationError(f"{name} must be an integer numpy array, got {getattr(array, 'dtype', type(array))}")
    if input_ids.ndim != 2 or input_ids.shape != position_ids.shape or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids {input_ids.shape} and position_ids {position_ids.shape} must both be [B, S], S > 0")
    batch = input_ids.shape[0]
    if past_len.shape != (batch,):
        raise ValueError(f"past_len must be [{batch}], got {past_len.shape}")
    if not 1 <= batch <= engine.max_batch:
        raise ValueError(f"batch {batch} exceeds the {engine.max_batch} rows allocated at load (max_batch)")
    if input_ids.shape[1] > engine.capacity:
        raise ValueError(f"{input_ids.shape[1]} tokens in one call exceed the cache capacity {engine.capacity}")
    check_token_ids(input_ids, engine.vocab_size)
    if position_ids.min() < 0 or position_ids.max() >= engine.max_positions:
        raise GenerationError(f"positions {int(position_ids.min())}..{int(position_ids.max())} are outside the "
                              f"model's 0..{engine.max_positions - 1} (max_position_embeddings); shorten the input")
    # storage indices (kvc.runtime.ring_slots): below 2C; a multi-token call must not cross C
    width, top = input_ids.shape[1], int(past_len.max())
    if past_len.min() < 0 or top >= 2 * engine.capacity or (width > 1 and top + width > engine.capacity):
        raise GenerationError(f"past_len {past_len.tolist()[:8]} with {width} tokens per row is outside the "
                              f"ring of {engine.capacity} slots (multi-token calls must end by slot "
                              f"{engine.capacity}; single tokens use storage indices below {2 * engine.capacity})")


def check_token_ids(ids, vocab_size: int) -> None:
    """Every id in [0, vocab_size), else one GenerationError naming the first bad one."""
    array = np.asarray(ids)
    if array.size and (array.min() < 0 or array.max() >= vocab_size):
        bad = array[(array < 0) | (array >= vocab_size)].flat[0]
        raise GenerationError(f"token id {int(bad)} is outside the model's vocabulary [0, {vocab_size}); "
                              "pass ids the tokenizer produced")
