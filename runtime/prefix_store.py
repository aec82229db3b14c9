"""Prompt KV shared across requests: the prefix cache of KvcModel.cache_prefix, filled automatically.

After a prompt is prefilled, the scheduler keeps a copy of its cache slots (``engine.read_slots``). A
later prompt that starts with the same tokens gets the longest common prefix written into its row
(``engine.write_slots``) and prefills only the rest. A key's slots at position i depend only on tokens
0..i, so any prefix of a stored prompt is reusable. Bounded by a token budget, least recently used
entries are dropped first.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PrefixMatch:
    length: int
    slots: list[np.ndarray]  # per cache tensor [kv_heads, length, ...]


class PrefixStore:
    def __init__(self, max_tokens: int, min_match: int = 1):
        self.max_tokens = max_tokens
        self.min_match = max(1, min_match)
        self._entries: OrderedDict[tuple[int, ...], list[np.ndarray]] = OrderedDict()
        self._tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, prompt: tuple[int, ...], slots: list[np.ndarray]) -> None:
        if self.max_tokens <= 0 or len(prompt) > self.max_tokens or prompt in self._entries:
            if prompt in self._entries:
                self._entries.move_to_end(prompt)
            return
        self._entries[prompt] = slots
        self._tokens += len(prompt)
        while self._tokens > self.max_tokens:
            old, _ = self._entries.popitem(last=False)
            self._tokens -= len(old)

    def match(self, prompt: list[int]) -> PrefixMatch | None:
        """The longest stored prefix of ``prompt`` that leaves at least one token to run (its logits
        give the first generated token)."""
        best_key, best_len = None, 0
        for key in self._entries:
            length = min(_common_prefix(key, prompt), len(prompt) - 1)
            if length > best_len:
                best_key, best_len = key, length
        if best_key is None or best_len < self.min_match:
            return None
        self._entries.move_to_end(best_key)
        return PrefixMatch(best_len, [t[:, :best_len] for t in self._entries[best_key]])


def _common_prefix(a: tuple[int, ...], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n
