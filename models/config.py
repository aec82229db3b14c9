"""Frozen, typed model configuration shared by the torch models, export, passes and planner."""
from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass, field
from typing import Any, Optional


class Family(str, enum.Enum):
    """Architecture family: decides the block structure of the torch model."""

    LLAMA = "llama"  # Llama 2/3, Mistral, Qwen2, SmolLM, TinyLlama: RMSNorm, RoPE, SwiGLU, GQA
    GPT2 = "gpt2"  # LayerNorm, learned positions, GELU MLP, fused c_attn


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
    sliding_window: Optional[int] = None  # Mistral-style window, in tokens
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

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

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
        if self.family is Family.GPT2:
            attn += q + 2 * kv + h
            mlp = 2 * h * self.intermediate_size + self.intermediate_size + h
            norms = 4 * h
            emb = self.vocab_size * h + self.max_position_embeddings * h
            final = 2 * h
        else:
            attn += ((q + 2 * kv) if self.attention_bias else 0) + (h if self.o_proj_bias else 0)
            mlp = 3 * h * self.intermediate_size
            norms = 2 * h
            emb = self.vocab_size * h
            final = h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return emb + L * (attn + mlp + norms) + final + head

    # --- serialisation (the export sidecar and artifact manifest carry this) ---
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["family"] = self.family.value
        if self.rope_scaling is not None:
            d["rope_scaling"]["kind"] = self.rope_scaling.kind.value
        d["eos_token_ids"] = list(self.eos_token_ids)
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
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
