"""Which request holds which cache row, and how a decode step covers them.

Engines run rows 0..B-1 of their caches in one call, so a step over a subset of rows must be a prefix of
the rows. Layout:
  row 0        the prefill row: a new request's prompt is prefilled here alone (B=1 calls), in chunks
               between decode steps; when done, its slots are copied to a decode row.
  rows 1..N    decode rows, one request each. With ``compact`` (the default) they stay packed: when a
               request ends, the last row's slots are copied into its row, so a decode step runs exactly
               busy + 1 rows. Without it a finished row stays a hole until reused and decode steps run
               up to the highest busy row, the holes on a dummy token.
Rows a step does not use for a request (row 0, holes) get token 0 at a storage index whose slot is
rewritten before anything reads it, so they are harmless: row 0 at the prefill's next write position,
a hole at slot 0 (a request placed there gets its whole prompt written over slots 0..L-1).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvc.runtime.serving_request import ServingRequest

PREFILL_ROW = 0


@dataclass(frozen=True)
class DecodeBatch:
    input_ids: np.ndarray  # [B, 1]
    positions: np.ndarray  # [B, 1]
    past_len: np.ndarray  # [B]
    requests: list[tuple[int, ServingRequest]]  # (row, request) of the rows that carry a request


class RowTable:
    def __init__(self, engine, compact: bool = True):
        if engine.max_batch < 2:
            raise ValueError("continuous batching needs max_batch >= 2 (row 0 prefills, rows 1.. decode)")
        self.engine = engine
        self.compact = compact
        self.rows: list[ServingRequest | None] = [None] * engine.max_batch  # index 0 is never a request's
        self.moves = 0  # slot copies made to keep rows packed
        self.rows_run = 0  # rows passed to decode calls, summed (busy rows + row 0 + holes)

    @property
    def decode_rows(self) -> int:
        return self.engine.max_batch - 1

    def busy(self) -> list[ServingRequest]:
        return [r for r in self.rows[1:] if r is not None]

    def free(self) -> int:
        return self.decode_rows - len(self.busy())

    def place(self, request: ServingRequest, slots: list[np.ndarray]) -> None:
        """Give the request the lowest free decode row and write its prompt's slots there."""
        row = self.rows.index(None, 1)
        self.engine.write_slots(row, slots)
        self.rows[row] = request
        request.row = row

    def release(self, request: ServingRequest) -> None:
        row, request.row = request.row, None
        self.rows[row] = None
        last = self._highest_busy()
        if self.compact and last > row:
            moved = self.rows[last]
            self.engine.write_slots(row, self.engine.read_slots(last, moved.cached))
            self.rows[row], self.rows[last] = moved, None
            moved.row = row
            self.moves += 1

    def clear(self) -> None:
        for request in self.busy():
            request.row = None
        self.rows = [None] * len(self.rows)

    def decode_batch(self, prefill_at: int) -> DecodeBatch | None:
        """Inputs of one decode step over rows 0..highest busy row; None when no row decodes.
        ``prefill_at``: the prefill row's next write position (0 when idle)."""
        width = self._highest_busy() + 1
        if width == 1:
            return None
        self.rows_run += width
        ids = np.zeros((width, 1), np.int64)
        past = np.zeros(width, np.int64)
        past[PREFILL_ROW] = prefill_at
        pairs = []
        for row in range(1, width):
            request = self.rows[row]
            if request is not None:
                ids[row, 0], past[row] = request.pending_token, request.cached
                pairs.append((row, request))
        # rows stay below capacity (prompts over it are refused, generation stops at it): no ring wrap,
        # so the storage index is the true position
        return DecodeBatch(ids, past[:, None].copy(), past, pairs)

    def _highest_busy(self) -> int:
        for row in range(len(self.rows) - 1, 0, -1):
            if self.rows[row] is not None:
                return row
        return 0
