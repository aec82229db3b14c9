"""How kvc's attention kernels read a KV cache slot: stored dtype, scales, dequantization as TIR.

Cache dtypes: float32, float16, int8 (x = q * scale) and float8 e4m3fn (x = fp8(bits) * scale), with
scales per token per kv head [B, K, C] or per kv head [K]. Everything evaluates to float32.
"""
from __future__ import annotations

from enum import Enum

from tvm import tirx

from kvc.compiler.tvm.kernels import float8

CACHE_DTYPES = ("float32", "float16", "int8", "float8_e4m3fn")
QUANTIZED_DTYPES = ("int8", "float8_e4m3fn")
QUERY_DTYPES = ("float32", "float16")


class ScaleLayout(Enum):
    NONE = "none"  # float32 / float16 caches
    PER_TOKEN = "per_token"  # [B, K, C]
    PER_HEAD = "per_head"  # [K]


def check_cache(kernel: str, cache_dtype: str, scale_layout: ScaleLayout, query_dtype: str) -> None:
    """Raise KvcError for a combination the kernels do not read."""
    from kvc.errors import KvcError

    if cache_dtype not in CACHE_DTYPES:
        raise KvcError(f"{kernel}: cache dtype {cache_dtype} is not one of {CACHE_DTYPES}")
    if query_dtype not in QUERY_DTYPES:
        raise KvcError(f"{kernel}: query dtype {query_dtype} is not one of {QUERY_DTYPES}")
    quantized = cache_dtype in QUANTIZED_DTYPES
    if quantized != (scale_layout is not ScaleLayout.NONE):
        raise KvcError(f"{kernel}: a {cache_dtype} cache needs {'scales' if quantized else 'no scales'}, "
                       f"got scale layout {scale_layout.value}")


def scale_shape(scale_layout: ScaleLayout, num_kv_heads: int, batch, capacity) -> tuple:
    """The scale buffer's shape; (1,) placeholder when there are none."""
    if scale_layout is ScaleLayout.PER_TOKEN:
        return (batch, num_kv_heads, capacity)
    if scale_layout is ScaleLayout.PER_HEAD:
        return (num_kv_heads,)
    return (1,)


def code_loader(cache_dtype: str, hardware_half: bool = False):
    """(cache, b, kv_head, slot, d) -> the stored code as float32, unscaled, as a TIR expression. ``hardware_half``:
    the target converts float16 in hardware, so float8 codes decode through it (float8.decode_bits_via_half)."""
    decode_fp8 = float8.decode_bits_via_half if hardware_half else float8.decode_bits

    def code(cache, b, kh, slot, d):
        value = cache[b, kh, slot, d]
        if cache_dtype == "float8_e4m3fn":
            return decode_fp8(tirx.reinterpret("uint8", value), float8.E4M3FN)
        return value if cache_dtype == "float32" else value.astype("float32")

    return code


def scaled(scale_layout: ScaleLayout, value, scales, b, kh, slot):
    """``value`` times the scale of (b, kv_head, slot); ``value`` itself for an unscaled cache."""
    if scale_layout is ScaleLayout.PER_TOKEN:
        return value * scales[b, kh, slot]
    if scale_layout is ScaleLayout.PER_HEAD:
        return value * scales[kh]
    return value


def slot_loader(cache_dtype: str, scale_layout: ScaleLayout, hardware_half: bool = False):
    """(cache, scales, b, kv_head, slot, d) -> the float32 value, as a TIR expression (code_loader, scaled)."""
    code = code_loader(cache_dtype, hardware_half)

    def load(cache, scales, b, kh, slot, d):
        return scaled(scale_layout, code(cache, b, kh, slot, d), scales, b, kh, slot)

    return load


def vector_lanes(head_dim: int) -> int:
    """Width of the vector accumulators for q.k dot products over head_dim."""
    return next(n for n in (16, 8, 4, 2, 1) if head_dim % n == 0)
