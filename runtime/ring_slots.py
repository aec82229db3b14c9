"""Which storage index (the graph's ``past_len``) the runtime passes for a token at true position t.

The compiled graph writes the token passed at storage index s into ring slot ``s mod C`` and, for a
single-token step, lets it see every slot once s >= C - 1 (passes.kv_ring_buffer's mask; slot c
holds storage index ``last - ((last - c) mod C)``). The graph never sees true positions except
through ``position_ids`` (RoPE), so the runtime alone decides which slot a token overwrites.

Attention sinks (StreamingLLM-style, ``sink_tokens`` = n): the first n slots keep the first n tokens
of the sequence forever and the other R = C - n slots are a ring for the most recent tokens::

    storage(t) = t                           if t < C
               = C + n + ((t - n) mod R)      if t >= C   (writes slot n + (t - n) mod R; all slots visible)

so a token t >= C attends to tokens 0..n-1 and to the last C - n tokens (itself included). Keys
stay rotated at their true positions (no re-rotation): this is window attention with sinks over
absolute positions, not StreamingLLM's positions relative to the cache. With n = 0 the slot
written is ``t mod C`` and every slot is visible, exactly the plain sliding window.

Tokens at t >= C must be run one per call (a multi-token chunk's storage indices would not be
consecutive); the generation loop never sends a multi-token chunk across or beyond t = C.
"""
from __future__ import annotations

import numpy as np


def storage_index(true_len: np.ndarray, capacity: int, sink_tokens: int = 0) -> np.ndarray:
    """``past_len`` to pass for the next token of each row, given the tokens each row holds [B]."""
    t = np.asarray(true_len, dtype=np.int64)
    if not 0 <= sink_tokens < capacity:
        raise ValueError(f"sink_tokens must be in [0, {capacity}), got {sink_tokens}")
    ring = capacity - sink_tokens
    wrapped = capacity + sink_tokens + np.mod(t - sink_tokens, ring)
    return np.where(t < capacity, t, wrapped)

