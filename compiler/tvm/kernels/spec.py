"""What kvc's attention kernels (decode and prefill) are built for: heads, cache storage, mask."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from kvc.compiler.tvm.kernels.kv_read import ScaleLayout, check_cache
from kvc.errors import KvcError


@dataclass(frozen=True)
class AttentionKernelSpec:
    kernel_name: ClassVar[str] = "attention"  # for error messages

    num_heads: int
    num_kv_heads: int
    head_dim: int
    cache_dtype: str = "float32"
    scale_layout: ScaleLayout = ScaleLayout.NONE
    query_dtype: str = "float32"
    has_mask: bool = False
    chunk_size: int = 64
    softmax_scale: float | None = None  # None: 1 / sqrt(head_dim)
    hardware_half: bool = False  # the target converts float16 -> float32 in hardware (x86 F16C); CPU kernels

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise KvcError(f"{self.num_heads} query heads are not a multiple of {self.num_kv_heads} kv heads")
        check_cache(self.kernel_name, self.cache_dtype, self.scale_layout, self.query_dtype)

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def scale(self) -> float:
        return self.softmax_scale if self.softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
