"""Integer dot products for the decode kernel's int8 caches on AVX-512 BW (x86 vpmaddwd), as TIR vector
expressions.

An int8 cache read as float costs a sign-extension and an int->float convert per 16 elements before each
multiply, and a 16-lane sum per (slot, head) for the scores: the int8 kernel was bound by that work, not by
memory. Here the cache codes are widened to int16 only and multiplied against an int16 copy of the other
operand (the query for scores, the softmax weights for values) by vpmaddwd, which multiplies 32 int16
pairs and adds neighbours into 16 int32 lanes (LLVM fuses it with the following add into AVX-512 VNNI's
vpdpwssd where the target has it). The int16 copies carry 15 bits plus sign per head, about 3e-5 of the
head's largest element, far below the int8 codes' own rounding (4e-3 of each token's largest).

int32 sums cannot overflow: |int16| <= 32767 and |int8| <= 128, so one dot over at most 256 elements (head
size; chunk slots for values) stays below 2**30.
"""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

LANES = 16  # int32 lanes of one zmm register
PAIR_WIDTH = 32  # int16 elements one vpmaddwd takes
KEY_BLOCK = 16  # slots whose scores one transposed lane sum yields
MAX_TERMS = 256  # dot length (head size, chunk slots) that keeps int32 sums exact
QMAX = 32767  # int16 range used for the quantized query and weights

_PMADDWD = "llvm.x86.avx512.pmaddw.d.512"


def applies(head_dim: int, chunk_size: int) -> bool:
    """Whether the integer path takes these sizes (else the kernel reads int8 as float)."""
    return head_dim % PAIR_WIDTH == 0 and chunk_size % KEY_BLOCK == 0 and max(head_dim, chunk_size) <= MAX_TERMS


def _pmaddwd(a: tirx.PrimExpr, b: tirx.PrimExpr) -> tirx.PrimExpr:
    """int16x32 a, b -> int32x16: lane i = a[2i] * b[2i] + a[2i+1] * b[2i+1]."""
    return tirx.call_llvm_pure_intrin("int32x16", _PMADDWD, a, b)


def _merge_pair(a: tirx.PrimExpr, b: tirx.PrimExpr, half: int) -> tirx.PrimExpr:
    """a and b hold consecutive segments of 2*half partial sums per slot; the result holds both vectors' slots
    in segments of ``half``: each slot's two halves added (one step of a transposed lane sum)."""
    segment = 2 * half
    low = [s * segment + i for s in range(LANES // segment) for i in range(half)]
    high = [i + half for i in low]

    def pick(lanes):
        return tirx.Shuffle([a, b], [tirx.const(i, "int32") for i in lanes + [LANES + i for i in lanes]])

    return pick(low) + pick(high)


def lane_sums(vectors: list) -> tirx.PrimExpr:
    """16 int32x16 vectors -> one int32x16 whose lane s is the sum of vector s's lanes: 15 adds and 30
    shuffles, against 16 separate horizontal sums of 4 dependent steps each."""
    assert len(vectors) == LANES
    half = LANES // 2
    while len(vectors) > 1:
        vectors = [_merge_pair(vectors[i], vectors[i + 1], half) for i in range(0, len(vectors), 2)]
        half //= 2
    return vectors[0]


def key_block_scores(q16, k16, g, head_dim: int) -> tirx.PrimExpr:
    """int32x16: dot(q16[g, :], k16[u, :]) for the block's 16 slots u (k16 [KEY_BLOCK, head_dim] int16)."""
    dots = []
    for u in range(KEY_BLOCK):
        terms = [_pmaddwd(q16.vload([g, j], "int16x32"), k16.vload([u, j], "int16x32"))
                 for j in range(0, head_dim, PAIR_WIDTH)]
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        dots.append(total)
    return lane_sums(dots)


# lane 2i takes a[i], lane 2i+1 takes b[i]: two slots' values side by side for one pair of weights
_INTERLEAVE = [tirx.const(i // 2 + (i % 2) * LANES, "int32") for i in range(2 * LANES)]


def value_pair_product(cache, w16, b, kh, slot_a, slot_b, g, t, d0) -> tirx.PrimExpr:
    """int32x16: w16[g, t] * cache[b, kh, slot_a, d] + w16[g, t+1] * cache[b, kh, slot_b, d] for the 16
    values d0 .. d0 + 15 (int8 cache codes, int16 weights)."""
    a = tirx.Cast("int16x16", cache.vload([b, kh, slot_a, d0], "int8x16"))
    c = tirx.Cast("int16x16", cache.vload([b, kh, slot_b, d0], "int8x16"))
    weight_pair = tirx.reinterpret("int32", w16.vload([g, t], "int16x2"))
    weights = tirx.reinterpret("int16x32", tirx.Broadcast(weight_pair, LANES))
    return _pmaddwd(tirx.Shuffle([a, c], _INTERLEAVE), weights)


# --- the decode kernel's integer steps, as TVMScript macros for its sizes --------------------------

def quantize_rows(rows: int, cols: int):
    """Macro (src [rows, cols] float32, dst int16, scale [rows]): per row scale = max |src| / 32767 (1 for a
    zero row) and dst = round(src / scale)."""

    @T.macro
    def quantize(src, dst, scale):
        for r in T.serial(T.int64(rows)):
            scale[r] = T.float32(0)
            for c in T.serial(T.int64(cols)):
                scale[r] = T.max(scale[r], T.abs(src[r, c]))
            scale[r] = T.if_then_else(scale[r] > T.float32(0), scale[r] / T.float32(QMAX), T.float32(1))
            for c in T.vectorized(T.int64(cols)):
                dst[r, c] = T.Cast("int16", T.round(src[r, c] / scale[r]))

    return quantize


def key_scores(groups: int, head_dim: int):
    """Macro: scores[g, t] = q16[g] . cache[b, kh, start + t] * q_scale[g] for the chunk's first ``valid`` slots,
    in blocks of 16 (the last block's extra slots read clamped into the ring; the caller drops them)."""

    @T.macro
    def scores_of_chunk(cache, k16, q16, q_scale, scores, b, kh, start, valid, capacity):
        for tb in T.serial((valid + (KEY_BLOCK - 1)) // KEY_BLOCK):
            for u in T.serial(T.int64(KEY_BLOCK)):
                for d in T.vectorized(T.int64(head_dim)):
                    k16[u, d] = T.Cast("int16", cache[b, kh, T.min(start + tb * KEY_BLOCK + u, capacity - 1), d])
            for g in T.serial(T.int64(groups)):
                scores[g, T.ramp(tb * KEY_BLOCK, 1, KEY_BLOCK)] = T.Cast(
                    "float32x16", key_block_scores(q16, k16, g, head_dim)) * T.Broadcast(q_scale[g], KEY_BLOCK)

    return scores_of_chunk


def weighted_values(groups: int, head_dim: int):
    """Macro: acc[g] += w_scale[g] * sum of w16[g, t] * cache[b, kh, start + t] over the chunk's first ``valid``
    slots t, in pairs (a pair's second slot past valid weighs 0: its read is clamped into the ring)."""

    @T.macro
    def add_chunk(cache, w16, w_scale, acc32, acc, b, kh, start, valid, capacity):
        for g in T.serial(T.int64(groups)):
            for d in T.vectorized(T.int64(head_dim)):
                acc32[g, d] = 0
        for tp in T.serial((valid + 1) // 2):
            for g in T.unroll(T.int64(groups)):
                for j in T.unroll(T.int64(head_dim // LANES)):
                    acc32[g, T.ramp(j * LANES, 1, LANES)] = acc32[g, T.ramp(j * LANES, 1, LANES)] + value_pair_product(
                        cache, w16, b, kh, start + tp * 2, T.min(start + tp * 2 + 1, capacity - 1), g, tp * 2,
                        j * LANES)
        for g in T.serial(T.int64(groups)):
            for d in T.vectorized(T.int64(head_dim)):
                acc[g, d] = acc[g, d] + T.Cast("float32", acc32[g, d]) * w_scale[g]

    return add_chunk
