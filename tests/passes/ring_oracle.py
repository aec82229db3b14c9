"""numpy float64 oracles for the synthetic decoder (tests/passes/synthetic.py).

* ``RingCache`` + ``ring_step``: the ring buffer itself. Writes go to slot (past_len + j) mod C one
  token at a time, and every slot remembers which storage index it holds, so visibility is
  simulated rather than taken from the graph's closed form. An optional codec quantizes each
  written K/V (in float32, exactly as the graph does) before it is stored.
* ``window_forward``: the concat semantics over the whole history with an optional sliding window
  (the model's own, or the capacity once the ring wraps): the "sliding-window oracle".
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from synthetic import DecoderSpec, DecoderWeights

# (x float32 [B, K, S, D], layer, "key" | "value") -> float32 after quantize + dequantize
Codec = Callable[[np.ndarray, int, str], np.ndarray]


def rope(x_BHSD: np.ndarray, w: DecoderWeights, pos_BS: np.ndarray) -> np.ndarray:
    half = x_BHSD.shape[-1] // 2
    cos = w.rope_cos.astype(np.float64)[pos_BS][:, None]
    sin = w.rope_sin.astype(np.float64)[pos_BS][:, None]
    x1, x2 = x_BHSD[..., :half], x_BHSD[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def heads(x_BSE: np.ndarray, weight: np.ndarray, n: int) -> np.ndarray:
    b, s, _ = x_BSE.shape
    return (x_BSE @ weight.astype(np.float64)).reshape(b, s, n, -1).transpose(0, 2, 1, 3)


def qkv(spec: DecoderSpec, w: DecoderWeights, layer: int, x_BSE: np.ndarray, pos_BS: np.ndarray):
    lw = w.layers[layer]
    q = heads(x_BSE, lw.wq, spec.num_heads)
    k = heads(x_BSE, lw.wk, spec.num_kv_heads)
    v = heads(x_BSE, lw.wv, spec.num_kv_heads)
    if spec.rope:
        q, k = rope(q, w, pos_BS), rope(k, w, pos_BS)
    return q, k, v


def attend(q_BHSD: np.ndarray, k_BKTD: np.ndarray, v_BKTD: np.ndarray, visible_BST: np.ndarray) -> np.ndarray:
    group = q_BHSD.shape[1] // k_BKTD.shape[1]
    k = np.repeat(k_BKTD, group, axis=1)
    v = np.repeat(v_BKTD, group, axis=1)
    scores = q_BHSD @ k.transpose(0, 1, 3, 2) / np.sqrt(q_BHSD.shape[-1])
    scores = np.where(visible_BST[:, None], scores, -np.inf)
    if not visible_BST.any(-1).all():
        raise AssertionError("oracle: a query sees no key; such rows are undefined, keep them out of tests")
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return probs @ v


def finish_layer(w: DecoderWeights, layer: int, x_BSE: np.ndarray, y_BHSD: np.ndarray) -> np.ndarray:
    b, _, s, _ = y_BHSD.shape
    y_BSE = y_BHSD.transpose(0, 2, 1, 3).reshape(b, s, -1)
    return x_BSE + y_BSE @ w.layers[layer].wo.astype(np.float64)


class RingCache:
    """Per-layer K/V rings [B, K, C, D] (float64) and the storage index held by each slot."""

    def __init__(self, spec: DecoderSpec, batch: int, capacity: int, codec: Optional[Codec] = None):
        shape = (batch, spec.num_kv_heads, capacity, spec.head_dim)
        self.capacity, self.codec = capacity, codec
        self.keys = [np.zeros(shape) for _ in range(spec.num_layers)]
        self.values = [np.zeros(shape) for _ in range(spec.num_layers)]
        self.slot_index = np.full((batch, capacity), -1, np.int64)  # storage index in each slot

    def store(self, layer: int, k_BKSD: np.ndarray, v_BKSD: np.ndarray, past_len: np.ndarray) -> None:
        if self.codec is not None:
            k_BKSD = self.codec(k_BKSD.astype(np.float32), layer, "key").astype(np.float64)
            v_BKSD = self.codec(v_BKSD.astype(np.float32), layer, "value").astype(np.float64)
        for b in range(k_BKSD.shape[0]):
            for j in range(k_BKSD.shape[2]):  # one token at a time: later tokens overwrite earlier ones
                slot = (past_len[b] + j) % self.capacity
                self.keys[layer][b, :, slot] = k_BKSD[b, :, j]
                self.values[layer][b, :, slot] = v_BKSD[b, :, j]

    def advance(self, past_len: np.ndarray, seq: int) -> None:
        for b in range(len(past_len)):
            for j in range(seq):
                self.slot_index[b, (past_len[b] + j) % self.capacity] = past_len[b] + j

    def visible(self, past_len: np.ndarray, seq: int, window: Optional[int]) -> np.ndarray:
        """[B, S, C]: query j (storage index past_len+j) sees slots written at or before it, in the window."""
        width = min(self.capacity, window or self.capacity)
        query = past_len[:, None, None] + np.arange(seq)[None, :, None]
        held = self.slot_index[:, None, :]
        return (held >= 0) & (held <= query) & (query - held < width)


def ring_step(spec: DecoderSpec, w: DecoderWeights, cache: RingCache, ids_BS: np.ndarray, pos_BS: np.ndarray,
              past_len_B: np.ndarray, window: Optional[int]) -> np.ndarray:
    """One forward call of the ring-buffer decoder: logits [B, S, V] in float64."""
    seq = ids_BS.shape[1]
    x = w.embed.astype(np.float64)[ids_BS]
    cache.advance(past_len_B, seq)
    visible = cache.visible(past_len_B, seq, window)
    for layer in range(spec.num_layers):
        q, k, v = qkv(spec, w, layer, x, pos_BS)
        cache.store(layer, k, v, past_len_B)
        x = finish_layer(w, layer, x, attend(q, cache.keys[layer], cache.values[layer], visible))
    return x @ w.lm_head.astype(np.float64)


def window_forward(spec: DecoderSpec, w: DecoderWeights, ids_BT: np.ndarray, pos_BT: np.ndarray,
                   window: Optional[int]) -> np.ndarray:
    """Concat semantics over the whole history: causal attention within ``window`` (None: full)."""
    total = ids_BT.shape[1]
    dist = np.arange(total)[:, None] - np.arange(total)[None, :]
    visible = (dist >= 0) & (dist < (window or total + 1))
    visible = np.broadcast_to(visible, (ids_BT.shape[0], total, total))
    x = w.embed.astype(np.float64)[ids_BT]
    for layer in range(spec.num_layers):
        q, k, v = qkv(spec, w, layer, x, pos_BT)
        x = finish_layer(w, layer, x, attend(q, k, v, visible))
    return x @ w.lm_head.astype(np.float64)
