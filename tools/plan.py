"""KV-cache memory planner: how many bytes a ring-buffer cache needs, what fits, and the bandwidth
floor of one decode step. Pure arithmetic on a ``ModelConfig``; nothing is loaded or run.

Conventions (stated in every output):
- Byte units: GB = 1e9 bytes (decimal), GiB = 2**30 bytes (binary).
- The cache holds ``min(context, sliding_window)`` tokens per sequence: kvc's ring buffer is exact
  for windowed models at any context once its capacity covers the window.
- Quantized caches carry scales (see kvc.contract and passes/kv_layout.py): int8 and dynamic fp8 keep one float32
  scale per token per kv head, for K and for V; static fp8 keeps one float32 per layer per kv head
  for K and for V, shared by all sequences.
- Memory counts weights + KV cache only: activations and runtime workspace come on top.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass, replace
from typing import Any, Optional

from kvc.contract import KvDtype, ScaleKind
from kvc.errors import KvcError
from kvc.models.config import Family, ModelConfig

SCALE_BYTES = 4  # scales are float32
GB = 10**9
GIB = 2**30


class WeightsDtype(str, enum.Enum):
    """Storage type assumed for the weights (quantization scales of int8 / fp8 weights not counted)."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    FP8 = "fp8"
    INT8 = "int8"

    @property
    def bytes_per_element(self) -> int:
        return 4 if self is WeightsDtype.FP32 else 2 if self in (WeightsDtype.FP16, WeightsDtype.BF16) else 1


# Which scale layouts each cache dtype can have; the first is the default.
_SCALE_KINDS: dict[KvDtype, tuple[ScaleKind, ...]] = {
    KvDtype.FP32: (ScaleKind.NONE,),
    KvDtype.FP16: (ScaleKind.NONE,),
    KvDtype.BF16: (ScaleKind.NONE,),
    KvDtype.INT8: (ScaleKind.PER_TOKEN,),
    KvDtype.FP8: (ScaleKind.STATIC_PER_HEAD, ScaleKind.PER_TOKEN),  # calibrated or dynamic
}


def parse_weights_dtype(text: str) -> WeightsDtype:
    try:
        return WeightsDtype(text.lower())
    except ValueError:
        raise KvcError(f"unknown weights dtype {text!r}; choose one of {[d.value for d in WeightsDtype]}") from None


@dataclass(frozen=True)
class PlanRequest:
    config: ModelConfig
    context: int  # tokens per sequence (prompt + generated)
    batch: int = 1
    kv_dtype: KvDtype = KvDtype.FP16
    kv_scales: Optional[ScaleKind] = None  # None: the dtype's default (int8 per token, fp8 static per head)
    weights_dtype: WeightsDtype = WeightsDtype.FP16
    memory_bytes: Optional[int] = None  # None: no memory limit to check against
    bandwidth_bytes_per_s: Optional[float] = None  # None: no decode-speed floor

    def __post_init__(self) -> None:
        for name in ("context", "batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise KvcError(f"{name} must be a positive integer, got {value!r}; pass --{name} N")
        if self.memory_bytes is not None and self.memory_bytes <= 0:
            raise KvcError(f"memory must be positive, got {self.memory_bytes}; pass e.g. --memory 80GB")
        if self.bandwidth_bytes_per_s is not None and self.bandwidth_bytes_per_s <= 0:
            raise KvcError(f"bandwidth must be positive, got {self.bandwidth_bytes_per_s}; "
                           "pass e.g. --bandwidth 3.35TB/s")
        allowed = _SCALE_KINDS[self.kv_dtype]
        if self.kv_scales is not None and self.kv_scales not in allowed:
            raise KvcError(f"a {self.kv_dtype.value} KV cache cannot have {self.kv_scales.value} scales; "
                           f"use one of {[k.value for k in allowed]}")

    @property
    def scale_kind(self) -> ScaleKind:
        return self.kv_scales if self.kv_scales is not None else _SCALE_KINDS[self.kv_dtype][0]


@dataclass(frozen=True)
class Plan:
    request: PlanRequest
    parameters: int
    weights_bytes: int  # all parameters at the weights dtype
    weights_read_bytes: int  # weights one decode step must stream (untied input embeddings are only gathered)
    kv_bytes_per_token: int  # K and V of one token, all layers, per-token scales included
    kv_scale_bytes_per_token: int  # the per-token scale share of kv_bytes_per_token
    kv_fixed_bytes: int  # static per-head scales, shared by the whole batch
    cache_tokens: int  # ring slots per sequence: min(context, sliding window)
    kv_bytes: int  # whole cache: batch x cache_tokens x per-token bytes + fixed bytes
    total_bytes: int  # weights + cache
    fits: Optional[bool]  # None without a memory limit
    max_cache_tokens: Optional[int]  # most ring slots per sequence that fit at this batch (0: not even one)
    max_context: Optional[int]  # largest context that fits at this batch; None: no memory given or unbounded
    max_batch: Optional[int]  # most sequences of this context that fit
    decode_floor_s: Optional[float]  # bandwidth lower bound of one decode step (whole batch)
    tokens_per_s_ceiling: Optional[float]  # batch / decode_floor_s (all sequences together)
    notes: tuple[str, ...]


def make_plan(request: PlanRequest) -> Plan:
    config = request.config
    per_token, scale_per_token, fixed = _kv_bytes(config, request.kv_dtype, request.scale_kind)
    cache_tokens = _cache_tokens(config, request.context)
    kv_bytes = request.batch * cache_tokens * per_token + fixed
    weights = config.num_parameters() * request.weights_dtype.bytes_per_element
    weights_read = _streamed_parameters(config) * request.weights_dtype.bytes_per_element
    fits = max_tokens = max_context = max_batch = None
    if request.memory_bytes is not None:
        free = request.memory_bytes - weights - fixed
        fits = weights + kv_bytes <= request.memory_bytes
        max_tokens = max(free // (request.batch * per_token), 0)
        max_batch = max(free // (cache_tokens * per_token), 0)
        window_fits = config.sliding_window is not None and max_tokens >= config.sliding_window
        max_context = None if window_fits else max_tokens
    floor = tokens_per_s = None
    if request.bandwidth_bytes_per_s is not None:
        floor = (weights_read + kv_bytes) / request.bandwidth_bytes_per_s
        tokens_per_s = request.batch / floor
    plan = Plan(request=request, parameters=config.num_parameters(), weights_bytes=weights,
                weights_read_bytes=weights_read, kv_bytes_per_token=per_token,
                kv_scale_bytes_per_token=scale_per_token, kv_fixed_bytes=fixed, cache_tokens=cache_tokens,
                kv_bytes=kv_bytes, total_bytes=weights + kv_bytes, fits=fits, max_cache_tokens=max_tokens,
                max_context=max_context, max_batch=max_batch, decode_floor_s=floor,
                tokens_per_s_ceiling=tokens_per_s, notes=())
    return _with_notes(plan)


def _kv_bytes(config: ModelConfig, dtype: KvDtype, scales: ScaleKind) -> tuple[int, int, int]:
    """(bytes per token incl. per-token scales, of which scales, fixed bytes of static scales)."""
    scale_slots = 2 * config.num_layers * config.num_kv_heads  # one per layer, kv head, K and V
    data = int(config.kv_bytes_per_token(dtype.bytes_per_element))
    per_token_scales = scale_slots * SCALE_BYTES if scales is ScaleKind.PER_TOKEN else 0
    fixed = scale_slots * SCALE_BYTES if scales is ScaleKind.STATIC_PER_HEAD else 0
    return data + per_token_scales, per_token_scales, fixed


def _cache_tokens(config: ModelConfig, context: int) -> int:
    return min(context, config.sliding_window) if config.sliding_window else context


def _streamed_parameters(config: ModelConfig) -> int:
    """Parameters a decode step reads in full: an untied input embedding (and GPT-2's position table)
    is only gathered, one row per token, so it leaves the floor; a tied one is read by the LM head."""
    gathered = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    if config.family is Family.GPT2:
        gathered += config.max_position_embeddings * config.hidden_size
    return config.num_parameters() - gathered


def _with_notes(plan: Plan) -> Plan:
    request, config = plan.request, plan.request.config
    notes = ["memory counts weights + KV cache only; activations and runtime workspace come on top"]
    if request.scale_kind is ScaleKind.PER_TOKEN:
        notes.append(f"{request.kv_dtype.value} cache: one float32 scale per token per kv head for K and for V "
                     f"({plan.kv_scale_bytes_per_token:,} B per token included)")
    elif request.scale_kind is ScaleKind.STATIC_PER_HEAD:
        notes.append(f"fp8 cache with static per-head scales: {plan.kv_fixed_bytes:,} B in all, included")
    if config.sliding_window is not None:
        notes.append(f"sliding window of {config.sliding_window:,} tokens: the ring holds "
                     f"min(context, window) = {plan.cache_tokens:,} tokens per sequence")
    if request.context > config.max_position_embeddings:
        notes.append(f"context {request.context:,} is past the model's max_position_embeddings "
                     f"({config.max_position_embeddings:,})")
    if request.memory_bytes is None:
        notes.append("no --memory given: max context, max batch and fit are not computed")
    elif plan.max_context is None:
        notes.append("the whole sliding window fits, so memory does not limit the context")
    elif plan.max_cache_tokens == 0:
        notes.append("the weights alone (plus any static scales) do not leave room for one token of cache")
    if request.bandwidth_bytes_per_s is None:
        notes.append("no --bandwidth given: the decode-step floor is not computed")
    else:
        notes.append("decode floor = (weights read + KV cache read) / bandwidth, untied input embeddings "
                     "excluded (only gathered); compute and overheads ignored")
    return replace(plan, notes=tuple(notes))


# --- units -------------------------------------------------------------------------------------

_UNIT_BYTES = {"b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,  # bare prefix: binary
               "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_QUANTITY_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]+)\s*$")
MEMORY_FORMS = "a number and a unit: 80GB (1e9 B), 80GiB (2^30 B), 24G (= GiB), 512MB, 1TB, 2048B"
BANDWIDTH_FORMS = "a number and a unit per second: 3.35TB/s, 900GB/s, 1.5TiB/s, 800G/s (= GiB/s)"


def _parse_quantity(text: str, forms: str, what: str) -> float:
    match = _QUANTITY_RE.match(text.lower())
    if match is None or match.group(2) not in _UNIT_BYTES:
        raise KvcError(f"cannot read {what} {text!r}; expected {forms}")
    value = float(match.group(1)) * _UNIT_BYTES[match.group(2)]
    if value <= 0:
        raise KvcError(f"{what} {text!r} must be positive; expected {forms}")
    return value


def parse_memory(text: str) -> int:
    """``80GB`` -> 80e9, ``80GiB`` / ``80G`` -> 80 * 2**30 bytes."""
    return int(_parse_quantity(text, MEMORY_FORMS, "memory"))


def parse_bandwidth(text: str) -> float:
    """``3.35TB/s`` -> 3.35e12 bytes per second (the ``/s`` is required)."""
    stripped = text.strip()
    if not stripped.lower().endswith("/s"):
        raise KvcError(f"cannot read bandwidth {text!r}; expected {BANDWIDTH_FORMS}")
    return _parse_quantity(stripped[:-2], BANDWIDTH_FORMS, "bandwidth")


# --- output ------------------------------------------------------------------------------------

def format_bytes(n: float) -> str:
    """Decimal and binary side by side: ``14.68 GB = 13.67 GiB``."""
    for dec, bin_, name in ((10**12, 2**40, "T"), (GB, GIB, "G"), (10**6, 2**20, "M"), (10**3, 2**10, "K")):
        if n >= dec:
            return f"{n / dec:,.2f} {name}B = {n / bin_:,.2f} {name}iB"
    return f"{n:,.0f} B"


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """Inputs and results as one flat JSON-ready dict (bytes as integers, times in seconds)."""
    r = plan.request
    return {
        "model": r.config.name, "family": r.config.family.value, "parameters": plan.parameters,
        "context": r.context, "batch": r.batch, "kv_dtype": r.kv_dtype.value, "kv_scales": r.scale_kind.value,
        "weights_dtype": r.weights_dtype.value, "memory_bytes": r.memory_bytes,
        "bandwidth_bytes_per_s": r.bandwidth_bytes_per_s, "sliding_window": r.config.sliding_window,
        "max_position_embeddings": r.config.max_position_embeddings,
        "weights_bytes": plan.weights_bytes, "weights_read_bytes": plan.weights_read_bytes,
        "kv_bytes_per_token": plan.kv_bytes_per_token, "kv_scale_bytes_per_token": plan.kv_scale_bytes_per_token,
        "kv_fixed_bytes": plan.kv_fixed_bytes, "cache_tokens": plan.cache_tokens, "kv_bytes": plan.kv_bytes,
        "total_bytes": plan.total_bytes, "fits": plan.fits, "max_cache_tokens": plan.max_cache_tokens,
        "max_context": plan.max_context, "max_batch": plan.max_batch, "decode_floor_s": plan.decode_floor_s,
        "tokens_per_s_ceiling": plan.tokens_per_s_ceiling, "units": "bytes; GB = 1e9 B, GiB = 2^30 B",
        "notes": list(plan.notes),
    }


def plan_rows(plan: Plan) -> list[tuple[str, str]]:
    """(label, value) rows of the human-readable table."""
    r, c = plan.request, plan.request.config
    rows = [
        ("model", f"{c.name or '(unnamed)'} ({c.family.value}, {plan.parameters / 1e9:,.3f} B parameters)"),
        ("shape", f"{c.num_layers} layers, {c.num_heads} heads, {c.num_kv_heads} kv heads, "
                  f"head dim {c.resolved_head_dim}"),
        ("context x batch", f"{r.context:,} tokens x {r.batch} (cache holds {plan.cache_tokens:,} per sequence)"),
        ("weights", f"{format_bytes(plan.weights_bytes)} at {r.weights_dtype.value}"),
        ("KV per token", f"{plan.kv_bytes_per_token:,} B = {format_bytes(plan.kv_bytes_per_token)} "
                         f"at {r.kv_dtype.value}"),
        ("KV cache", format_bytes(plan.kv_bytes)),
        ("weights + KV", format_bytes(plan.total_bytes)),
    ]
    if r.memory_bytes is not None:
        rows += [("memory", f"{format_bytes(r.memory_bytes)}: {'fits' if plan.fits else 'does NOT fit'}"),
                 ("max context", _max_context_text(plan)),
                 ("max batch", f"{plan.max_batch:,} at {r.context:,} tokens")]
    if r.bandwidth_bytes_per_s is not None:
        rows += [("bandwidth", f"{r.bandwidth_bytes_per_s / 1e12:,.3f} TB/s"),
                 ("decode step floor", f"{plan.decode_floor_s * 1e3:,.3f} ms "
                                       f"(reads {format_bytes(plan.weights_read_bytes + plan.kv_bytes)})"),
                 ("tokens/s ceiling", f"{plan.tokens_per_s_ceiling:,.1f} (all {r.batch} sequences; "
                                      f"{plan.tokens_per_s_ceiling / r.batch:,.1f} each)")]
    return rows


def _max_context_text(plan: Plan) -> str:
    if plan.max_context is None:
        return f"unlimited (the {plan.request.config.sliding_window:,}-token window fits)"
    return f"{plan.max_context:,} tokens at batch {plan.request.batch}"


def plan_table(plan: Plan):
    """A rich Table of ``plan_rows`` with the notes as its caption."""
    from rich.table import Table

    table = Table(title="kvc plan", show_header=False, caption="\n".join(f"- {n}" for n in plan.notes),
                  caption_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for label, value in plan_rows(plan):
        table.add_row(label, value)
    return table
