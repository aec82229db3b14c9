"""Frozen, typed model configuration shared by the torch models, export, passes and planner."""
from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass, field
from typing import Any, Optional


class Family(str, enum.Enum):
    """Architecture family: where the weights come from. GPT-2 has its own torch model; every other family is
    the RoPE decoder in llama.py, shaped by the feature fields of ModelConfig (norms, q/k norm, multipliers...)."""

    LLAMA = "llama"  # Llama 2/3, Mistral, Qwen2, SmolLM, TinyLlama: RMSNorm, RoPE, SwiGLU, GQA
    GPT2 = "gpt2"  # LayerNorm, learned positions, GELU MLP, fused c_attn
    QWEN3 = "qwen3"  # + RMSNorm of q and k per head
    PHI3 = "phi3"  # fused qkv_proj / gate_up_proj in the checkpoint (split on load), partial rotary
    GEMMA = "gemma"  # embedding x sqrt(hidden), (1 + w) RMSNorm, GeLU-tanh MLP
    GEMMA2 = "gemma2"  # + pre/post norms around both sublayers, softcapping, alternating sliding/full layers
    SMOLLM3 = "smollm3"  # Llama with NoPE layers (no rotary in every Nth layer)
    OLMO2 = "olmo2"  # norms after each sublayer, RMSNorm of the whole q and k projections
    GRANITE = "granite"  # embedding / residual / attention / logits multipliers
    STABLELM = "stablelm"  # LayerNorm with bias, partial rotary, optional q/k/v bias


class NormKind(str, enum.Enum):
    RMS = "rms"  # x / rms(x) * w
    RMS_UNIT_OFFSET = "rms_unit_offset"  # x / rms(x) * (1 + w)  (Gemma)
    LAYER = "layer"  # LayerNorm with weight and bias (StableLM)


class NormPlacement(str, enum.Enum):
    """Where a block normalizes. Parameter names follow HF in each case."""

    PRE = "pre"  # input_layernorm -> attn, post_attention_layernorm -> mlp (Llama)
    SANDWICH = "sandwich"  # input_ -> attn -> post_attention_, pre_feedforward_ -> mlp -> post_feedforward_ (Gemma2)
    POST = "post"  # attn -> post_attention_layernorm, mlp -> post_feedforward_layernorm (OLMo2)


class QkNorm(str, enum.Enum):
    NONE = "none"
    PER_HEAD = "per_head"  # over head_dim of every head, before RoPE (Qwen3)
    PROJECTION = "projection"  # over the whole q / k projection output, before the head split (OLMo2)


class Activation(str, enum.Enum):
    """The gate activation of the gated MLP (GPT-2 always uses GeLU-tanh)."""

    SILU = "silu"
    GELU_TANH = "gelu_tanh"


class RopeScalingKind(str, enum.Enum):
    LINEAR = "linear"
    LLAMA3 = "llama3"


@dataclass(frozen=True)
class RopeScaling:
    kind: RopeScalingKind
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    family: Family
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int = 2048
    head_dim: Optional[int] = None  # None: hidden_size // num_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    attention_bias: bool = False  # q/k/v projection bias (Qwen2; always on for GPT-2)
    o_proj_bias: bool = False  # HF Llama with attention_bias=True also biases o_proj (Qwen2 does not)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: Optional[int] = None  # Mistral-style window, in tokens, for every layer
    # --- features of the newer families (defaults: Llama) ---
    norm: NormKind = NormKind.RMS
    norm_placement: NormPlacement = NormPlacement.PRE
    qk_norm: QkNorm = QkNorm.NONE
    activation: Activation = Activation.SILU
    partial_rotary_factor: float = 1.0  # rotary on the first head_dim * factor dims of each head
    nope_layers: tuple[int, ...] = ()  # layers without rotary (SmolLM3)
    layer_windows: tuple[Optional[int], ...] = ()  # per-layer window (None: full); () = sliding_window everywhere
    attention_scale: Optional[float] = None  # None: 1 / sqrt(head_dim)
    attn_logit_softcap: Optional[float] = None  # scores -> cap * tanh(scores / cap) before the mask
    final_logit_softcap: Optional[float] = None  # logits -> cap * tanh(logits / cap)
    embedding_multiplier: float = 1.0  # token embeddings x this (Gemma: sqrt(hidden); Granite)
    residual_multiplier: float = 1.0  # sublayer outputs x this before the residual add (Granite)
    logits_divisor: float = 1.0  # logits / this (Granite's logits_scaling)
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""  # informative: preset or checkpoint name

    def __post_init__(self) -> None:
        from kvc.errors import CheckpointError

        for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            if getattr(self, f) <= 0:
                raise CheckpointError(f"model config: {f} must be positive, got {getattr(self, f)}")
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"model config: num_heads ({self.num_heads}) is not divisible by num_kv_heads "
                f"({self.num_kv_heads}); grouped-query attention needs whole groups")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise CheckpointError(
                f"model config: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                "set head_dim explicitly")
        if self.resolved_head_dim % 2:
            raise CheckpointError(f"model config: head_dim {self.resolved_head_dim} must be even for RoPE")
        _check_features(self, CheckpointError)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        """Leading dims of each head that RoPE rotates (the rest pass through)."""
        return int(self.resolved_head_dim * self.partial_rotary_factor)

    def uses_rope(self, layer: int) -> bool:
        return layer not in self.nope_layers

    def window_for_layer(self, layer: int) -> Optional[int]:
        return self.layer_windows[layer] if self.layer_windows else self.sliding_window

    @property
    def has_per_layer_windows(self) -> bool:
        return len(set(self.layer_windows)) > 1

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def kv_bytes_per_token(self, bytes_per_element: float) -> float:
        """K and V for one token across all layers: 2 x layers x kv_heads x head_dim x bytes."""
        return 2 * self.num_layers * self.num_kv_heads * self.resolved_head_dim * bytes_per_element

    def num_parameters(self) -> int:
        h, d, L = self.hidden_size, self.resolved_head_dim, self.num_layers
        q, kv = self.num_heads * d, self.num_kv_heads * d
        attn = h * (q + 2 * kv) + q * h
        per_norm = 2 * h if self.norm is NormKind.LAYER else h
        if self.family is Family.GPT2:
            attn += q + 2 * kv + h
            mlp = 2 * h * self.intermediate_size + self.intermediate_size + h
            norms = 4 * h
            emb = self.vocab_size * h + self.max_position_embeddings * h
            final = 2 * h
        else:
            attn += ((q + 2 * kv) if self.attention_bias else 0) + (h if self.o_proj_bias else 0)
            attn += {QkNorm.NONE: 0, QkNorm.PER_HEAD: 2 * d, QkNorm.PROJECTION: q + kv}[self.qk_norm]
            mlp = 3 * h * self.intermediate_size + ((2 * self.intermediate_size + h) if self.mlp_bias else 0)
            norms = (4 if self.norm_placement is NormPlacement.SANDWICH else 2) * per_norm
            emb = self.vocab_size * h
            final = per_norm
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return emb + L * (attn + mlp + norms) + final + head

    # --- serialisation (the export sidecar and artifact manifest carry this) ---
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name, value in d.items():
            if isinstance(value, enum.Enum):
                d[name] = value.value
            elif isinstance(value, tuple):
                d[name] = list(value)
        if self.rope_scaling is not None:
            d["rope_scaling"]["kind"] = self.rope_scaling.kind.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        from kvc.errors import CheckpointError

        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise CheckpointError(f"model config: unknown fields {sorted(unknown)}")
        d = dict(d)
        try:
            d["family"] = Family(d["family"])
        except (KeyError, ValueError):
            raise CheckpointError(f"model config: unknown family {d.get('family')!r}; expected one of "
                                  f"{[f.value for f in Family]}") from None
        if d.get("rope_scaling") is not None:
            rs = dict(d["rope_scaling"])
            rs["kind"] = RopeScalingKind(rs["kind"])
            d["rope_scaling"] = RopeScaling(**rs)
        try:
            for name, kind in _ENUM_FIELDS.items():
                if name in d:
                    d[name] = kind(d[name])
        except ValueError as exc:
            raise CheckpointError(f"model config: {exc}") from None
        for name in _TUPLE_FIELDS:
            if name in d:
                d[name] = tuple(d[name])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


_ENUM_FIELDS = {"norm": NormKind, "norm_placement": NormPlacement, "qk_norm": QkNorm, "activation": Activation}
_TUPLE_FIELDS = ("eos_token_ids", "nope_layers", "layer_windows")


def _check_features(c: ModelConfig, error: type[Exception]) -> None:
    """The feature fields describe a model the torch definition can build."""
    if not 0 < c.partial_rotary_factor <= 1 or c.rotary_dim % 2 or c.rotary_dim == 0:
        raise error(f"model config: partial_rotary_factor {c.partial_rotary_factor} gives {c.rotary_dim} rotary dims "
                    f"of head_dim {c.resolved_head_dim}; RoPE needs a positive even number")
    if any(not 0 <= i < c.num_layers for i in c.nope_layers):
        raise error(f"model config: nope_layers {list(c.nope_layers)} names layers outside 0..{c.num_layers - 1}")
    if c.layer_windows and len(c.layer_windows) != c.num_layers:
        raise error(f"model config: layer_windows has {len(c.layer_windows)} entries for {c.num_layers} layers")
    if c.layer_windows and len(set(c.layer_windows)) == 1:
        raise error("model config: layer_windows with the same window in every layer: use sliding_window")
    if c.layer_windows and c.sliding_window is not None:
        raise error("model config: give either sliding_window (every layer) or layer_windows (per layer), not both")
    if any(w is not None and w < 1 for w in (c.sliding_window, *c.layer_windows)):
        raise error("model config: sliding windows must be positive token counts")
    for name in ("attention_scale", "attn_logit_softcap", "final_logit_softcap"):
        value = getattr(c, name)
        if value is not None and value <= 0:
            raise error(f"model config: {name} must be positive, got {value}")
    for name in ("embedding_multiplier", "residual_multiplier", "logits_divisor"):
        if getattr(c, name) <= 0:
            raise error(f"model config: {name} must be positive, got {getattr(c, name)}")


def _ranges(layers: list[int]) -> str:
    return ", ".join(str(i) for i in layers[:8]) + (f" and {len(layers) - 8} more" if len(layers) > 8 else "")
