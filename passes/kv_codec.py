"""numpy reference of the KV-cache codecs, computing exactly what the quantized graph computes.

All arithmetic in float32, like the graph:
  fp16 / bf16  x -> cast (round to nearest even) -> cast back
  int8         scale = max|x| over head_dim / 127 per token per kv head (0 -> 1);
               q = saturate_int8(round_half_even(x / scale)); x' = q * scale
  fp8 dynamic  scale = max|x| over head_dim / 448 (0 -> 1); q = e4m3fn(clip(x / scale, +-448)); x' = q * scale
  fp8 static   scale = the calibrated per-kv-head constant of the layer; otherwise as fp8 dynamic
Tensors are [batch, kv_heads, seq, head_dim]; per-token scales are [batch, kv_heads, seq, 1].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import ml_dtypes
import numpy as np

from kvc.contract import KvDtype
from kvc.passes.kv_layout import KvQuantOptions

INT8_MAX = 127.0
FP8_E4M3_MAX = 448.0
_STORAGE = {KvDtype.FP32: np.float32, KvDtype.FP16: np.float16, KvDtype.BF16: ml_dtypes.bfloat16,
            KvDtype.INT8: np.int8, KvDtype.FP8: ml_dtypes.float8_e4m3fn}


@dataclass(frozen=True)
class Encoded:
    data: np.ndarray  # in the cache dtype
    scale: Optional[np.ndarray]  # float32, broadcastable to data; None for fp32/fp16/bf16


def qmax(dtype: KvDtype) -> float:
    return INT8_MAX if dtype is KvDtype.INT8 else FP8_E4M3_MAX


def per_token_scale(x: np.ndarray, dtype: KvDtype) -> np.ndarray:
    """max|x| over the last axis / qmax, with zero rows given scale 1 so they encode as 0."""
    amax = np.abs(x.astype(np.float32)).max(axis=-1, keepdims=True)
    scale = amax / np.float32(qmax(dtype))
    return np.where(scale == 0, np.float32(1), scale).astype(np.float32)


def static_scale(per_head: tuple[float, ...]) -> np.ndarray:
    """[1, kv_heads, 1, 1] float32 from one layer's calibrated scales."""
    return np.asarray(per_head, np.float32).reshape(1, -1, 1, 1)


def encode(x: np.ndarray, dtype: KvDtype, scale: Optional[np.ndarray] = None) -> Encoded:
    x = x.astype(np.float32)
    if dtype in (KvDtype.FP32, KvDtype.FP16, KvDtype.BF16):
        return Encoded(x.astype(_STORAGE[dtype]), None)
    if scale is None:
        scale = per_token_scale(x, dtype)
    ratio = x / scale
    if dtype is KvDtype.INT8:
        return Encoded(np.clip(np.rint(ratio), -128, 127).astype(np.int8), scale)
    return Encoded(np.clip(ratio, -FP8_E4M3_MAX, FP8_E4M3_MAX).astype(ml_dtypes.float8_e4m3fn), scale)


def decode(encoded: Encoded) -> np.ndarray:
    values = encoded.data.astype(np.float32)
    return values if encoded.scale is None else values * encoded.scale


class KvCodec:
    """The codec a KvQuantOptions describes, per layer and kind, as the oracle's quantize hook."""

    def __init__(self, options: KvQuantOptions):
        self.options = options

    def scale_for(self, layer: int, kind: str) -> Optional[np.ndarray]:
        scales = self.options.fp8_scales
        if scales is None:
            return None
        return static_scale((scales.key if kind == "key" else scales.value)[layer])

    def encode(self, x: np.ndarray, layer: int, kind: str) -> Encoded:
        return encode(x, self.options.dtype, self.scale_for(layer, kind))

    def __call__(self, x: np.ndarray, layer: int, kind: str) -> np.ndarray:
        """Quantize then dequantize: what attention reads back after ``x`` was written."""
        return decode(self.encode(x, layer, kind))
