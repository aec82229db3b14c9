"""How many ring slots the ORT engine binds for a step: enough for the live context, not the capacity.

A graph lowered by ``kvc.passes.lower_ort_live_slots`` reads its slot count from the bound buffers,
so a step over N slots costs O(N) in attention, the ring mask and int8/fp8 dequantization. The
engine keeps N a power of two (at least MIN_SLOTS) at or above the tokens the step needs, so the
buffers are resized (rows copied) about log2(C) times per long sequence, never per step; once a row
needs more than the capacity (the ring has wrapped) N is the capacity itself, where the ring's
modulus must be C.
"""
from __future__ import annotations

MIN_SLOTS = 256


def slots_for(needed: int, capacity: int, minimum: int = MIN_SLOTS) -> int:
    """Slots to bind for a step whose rows need at most ``needed`` (= max past_len + S) slots."""
    if needed >= capacity:
        return capacity
    slots = max(minimum, 1)
    while slots < needed:
        slots *= 2
    return min(slots, capacity)
