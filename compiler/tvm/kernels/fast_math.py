"""Vectorizable float32 exp, and a pairwise lane sum, for kvc's CPU kernels.

``T.exp`` lowers to the C library's expf, one scalar call per element even inside a vectorized
loop (LLVM has no vector math library here); softmax over a 2048-token cache makes ~10^5 such
calls per decode step. This is the Cephes polynomial (max relative error ~2 ulp on the clamped
range), built from plain arithmetic so LLVM turns a vectorized loop of it into AVX2 code.
"""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

_LOG2E = 1.44269504088896341
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4  # ln 2 split so x - n*ln2 stays exact
_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
_MAX_ARG, _MIN_ARG = 88.3762626647949, -88.3762626647949  # beyond: inf / 0 in float32


def exp_f32(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """e**x for float32 ``x``; -inf (and anything below -88.38) gives 0, +inf saturates at ~3.4e38."""
    f32 = "float32"
    c = lambda v: tirx.const(v, f32)  # noqa: E731
    x = tirx.max(tirx.min(x, c(_MAX_ARG)), c(_MIN_ARG))
    n = tirx.floor(x * c(_LOG2E) + c(0.5))
    r = x - n * c(_LN2_HI) - n * c(_LN2_LO)
    poly = c(_POLY[0])
    for coefficient in _POLY[1:]:
        poly = poly * r + c(coefficient)
    y = poly * (r * r) + r + c(1.0)
    # 2**n from the exponent bits; n = -127 at the clamp gives the bit pattern of 0.0.
    two_n = tirx.reinterpret(f32, (n.astype("int32") + tirx.const(127, "int32")) << tirx.const(23, "int32"))
    return y * two_n


def lane_sum(lanes: int):
    """A TVMScript macro summing ``buf[0:lanes]`` into ``buf[0]`` pairwise (lanes a power of two up to
    16): log2(lanes) vector adds instead of a chain of ``lanes`` dependent scalar adds."""

    @T.macro
    def tree_sum(buf):
        if lanes >= 16:
            for lane in T.vectorized(T.int64(8)):
                buf[lane] = buf[lane] + buf[lane + 8]
        if lanes >= 8:
            for lane in T.vectorized(T.int64(4)):
                buf[lane] = buf[lane] + buf[lane + 4]
        if lanes >= 4:
            for lane in T.vectorized(T.int64(2)):
                buf[lane] = buf[lane] + buf[lane + 2]
        if lanes >= 2:
            buf[0] = buf[0] + buf[1]

    return tree_sum
