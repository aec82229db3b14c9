"""The ring-buffer KV-cache contract: names, dtypes and shapes of the rewritten graph's I/O.

The runtime binds to exactly this. After ``KvRingBufferPass`` (and optionally ``KvQuantizePass``):

inputs
  input_ids      [batch, seq] int64
  position_ids   [batch, seq] int64   RoPE positions; they keep growing after the ring wraps
  past_len       [batch] int64        tokens already written for each sequence (a storage counter,
                                      never capped at the capacity)
  past_key_values.{i}.key / .value              [batch, kv_heads, C, head_dim]  cache dtype
  past_key_values.{i}.key_scale / .value_scale  [batch, kv_heads, C, 1] float32 (int8 and
                                      dynamic fp8 only: one scale per token per kv head; static fp8
                                      scales are constants inside the graph)
outputs
  logits         [batch, seq, vocab]
  present.{i}.key / .value (/ .key_scale / .value_scale): the updated caches, same shape and dtype
                 as the inputs; bind each to the same buffer as its input (IO binding), so the
                 update is in place.

Update and read, per layer:
  write_indices = past_len mod C; present = TensorScatter(past, new, write_indices, mode="circular")
  Attention reads the whole present cache with nonpad_kv_seqlen = min(past_len + seq, C) and an
  additive mask [batch, 1, seq, C]: slot c holds storage index t(c) = the latest t < past_len+seq
  with t mod C == c; query i (storage index past_len+i) sees slot c iff t(c) >= 0,
  t(c) <= past_len+i and past_len+i - t(c) < min(C, window). Once the ring wraps this is
  sliding-window attention of width C. ``window`` is the model's sliding window, or each layer's own
  where the layers differ (Gemma2: one mask per distinct window, each layer reading its own).

One call may write at most C tokens per sequence: with seq > C a query's own key is overwritten
within the call and its row of the mask is empty (meaningless output), so prefill longer prompts in
chunks of at most C tokens. After a wrap, query i of a chunk sees the slots still holding tokens
in [past_len + seq - C, past_len + i]: the full window for single-token decode, narrower for the
early queries of a multi-token chunk (tokens of this very chunk have overwritten them).

Batches with different lengths: every sequence has its own past_len. In prefill, shorter prompts are
right-padded to seq; their padding tokens are written to the ring but no real query of that
sequence can see them (they lie after it: causality), and the next step, called with that
sequence's true past_len, overwrites them. Logits at padding positions are meaningless.

Cache buffers must be finite before the first write (allocate them zero-filled): slots at or after
nonpad_kv_seqlen get zero attention weight, but ONNX Runtime 1.31's CPU Attention still multiplies
that zero by the value slot, so a NaN left there would leak (0 * NaN).

The same description travels inside the graph as JSON in metadata_props[kvc.contract.LAYOUT_KEY].
Names, dtypes and scale kinds are kvc.contract's; this module adds what needs onnx-ir.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

import onnx_ir as ir

from kvc.contract import (
    INPUT_IDS,
    LAYOUT_KEY,
    LOGITS,
    PAST_LEN,
    POSITION_IDS,
    CacheLayoutKind,
    KvDtype,
    ScaleKind,
    cache_io_names,
)
from kvc.errors import GraphError, KvcError


def ir_dtype(dtype: KvDtype) -> ir.DataType:
    """The onnx-ir element type of a cache stored as ``dtype``."""
    return _IR_DTYPES[dtype]


_IR_DTYPES = {KvDtype.FP32: ir.DataType.FLOAT, KvDtype.FP16: ir.DataType.FLOAT16,
              KvDtype.BF16: ir.DataType.BFLOAT16, KvDtype.INT8: ir.DataType.INT8,
              KvDtype.FP8: ir.DataType.FLOAT8E4M3FN}


@dataclass(frozen=True)
class RingBufferOptions:
    capacity: int  # C: cache slots per sequence
    sliding_window: Optional[int] = None  # the model's own attention window (resolved by the caller)
    # Per layer (None: full attention) when the layers differ; then sliding_window must be None.
    layer_windows: tuple[Optional[int], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.capacity, int) or self.capacity < 1:
            raise KvcError(f"KV-cache capacity must be a positive integer, got {self.capacity!r}; "
                           "pass --capacity N")
        for window in (self.sliding_window, *self.layer_windows):
            if window is not None and (not isinstance(window, int) or window < 1):
                raise KvcError(f"sliding window must be a positive integer or None, got {window!r}")
        if self.layer_windows and self.sliding_window is not None:
            raise KvcError("give either one sliding window or per-layer windows, not both")

    def window_of(self, layer: int) -> Optional[int]:
        """Layer ``layer``'s window (None: full attention)."""
        return self.layer_windows[layer] if self.layer_windows else self.sliding_window


@dataclass(frozen=True)
class Fp8Scales:
    """Static (calibrated) fp8 scales: ``key[layer][kv_head]``, ``value[layer][kv_head]``."""

    key: tuple[tuple[float, ...], ...]
    value: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        for name, table in (("key", self.key), ("value", self.value)):
            for layer, row in enumerate(table):
                bad = [s for s in row if not (s > 0 and s < float("inf"))]
                if bad:
                    raise KvcError(f"fp8 {name} scales of layer {layer} must be finite and > 0, got {bad}; "
                                   "re-run kvc calibrate")
        if len(self.key) != len(self.value):
            raise KvcError(f"fp8 scales: {len(self.key)} key layers but {len(self.value)} value layers; "
                           "re-run kvc calibrate")

    def to_dict(self) -> dict[str, Any]:
        return {"key": [list(r) for r in self.key], "value": [list(r) for r in self.value]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Fp8Scales":
        try:
            return cls(key=tuple(tuple(float(s) for s in r) for r in d["key"]),
                       value=tuple(tuple(float(s) for s in r) for r in d["value"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise KvcError(f"fp8 scales must look like {{'key': [[s per kv head] per layer], 'value': ...}}: "
                           f"{exc}; re-run kvc calibrate") from None


@dataclass(frozen=True)
class KvQuantOptions:
    dtype: KvDtype = KvDtype.FP32
    fp8_scales: Optional[Fp8Scales] = None  # fp8 only: static scales; None means dynamic per token

    def __post_init__(self) -> None:
        if not isinstance(self.dtype, KvDtype):
            raise KvcError(f"KvQuantOptions.dtype must be a KvDtype, got {self.dtype!r}; "
                           "use kvc.contract.parse_kv_dtype")
        if self.fp8_scales is not None and not isinstance(self.fp8_scales, Fp8Scales):
            raise KvcError("KvQuantOptions.fp8_scales must be an Fp8Scales (Fp8Scales.from_dict(json))")
        if self.fp8_scales is not None and self.dtype is not KvDtype.FP8:
            raise KvcError(f"static fp8 scales were given but the cache dtype is {self.dtype.value}; "
                           "drop the scales or choose fp8")

    @property
    def scale_kind(self) -> ScaleKind:
        if self.dtype is KvDtype.INT8 or (self.dtype is KvDtype.FP8 and self.fp8_scales is None):
            return ScaleKind.PER_TOKEN
        if self.dtype is KvDtype.FP8:
            return ScaleKind.STATIC_PER_HEAD
        return ScaleKind.NONE


@dataclass(frozen=True)
class KvCacheLayout:
    """What the rewritten graph expects; stored as JSON in metadata_props[kvc.contract.LAYOUT_KEY]."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    capacity: int
    sliding_window: Optional[int] = None  # the model's own window (None: full attention, or per-layer windows)
    dtype: KvDtype = KvDtype.FP32
    scales: ScaleKind = ScaleKind.NONE
    layer_windows: tuple[Optional[int], ...] = ()  # per layer when the layers differ (None: full attention)

    @property
    def effective_window(self) -> int:
        """Widest span a query can see: the capacity, narrowed by the model's window."""
        return min(self.capacity, self.sliding_window or self.capacity)

    def cache_shape(self, batch: int) -> tuple[int, int, int, int]:
        return (batch, self.num_kv_heads, self.capacity, self.head_dim)

    def scale_shape(self, batch: int) -> tuple[int, int, int, int]:
        return (batch, self.num_kv_heads, self.capacity, 1)

    def cache_names(self) -> list[tuple[str, str]]:
        """(input, output) pairs of every cache tensor, in graph order; bind each pair to one buffer."""
        return cache_io_names(self.num_layers, with_scales=self.scales is ScaleKind.PER_TOKEN)

    def input_names(self) -> list[str]:
        return [INPUT_IDS, POSITION_IDS, PAST_LEN] + [i for i, _ in self.cache_names()]

    def output_names(self) -> list[str]:
        return [LOGITS] + [o for _, o in self.cache_names()]

    def to_dict(self) -> dict[str, Any]:
        layer_windows = {"layer_windows": list(self.layer_windows)} if self.layer_windows else {}
        return {"layout": CacheLayoutKind.RING.value, "num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "capacity": self.capacity, "sliding_window": self.sliding_window,
                "dtype": self.dtype.value, "scales": self.scales.value, **layer_windows}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "KvCacheLayout":
        return cls(num_layers=d["num_layers"], num_kv_heads=d["num_kv_heads"], head_dim=d["head_dim"],
                   capacity=d["capacity"], sliding_window=d["sliding_window"], dtype=KvDtype(d["dtype"]),
                   scales=ScaleKind(d["scales"]), layer_windows=tuple(d.get("layer_windows", ())))

    def write_to(self, model: ir.Model) -> None:
        model.metadata_props[LAYOUT_KEY] = json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def read_from(cls, model: ir.Model) -> "KvCacheLayout":
        text = model.metadata_props.get(LAYOUT_KEY)
        if text is None:
            raise GraphError(f"this graph has no {LAYOUT_KEY} metadata, so its KV cache is not a ring buffer; "
                             "run the KV ring-buffer pass first")
        return cls.from_dict(json.loads(text))
