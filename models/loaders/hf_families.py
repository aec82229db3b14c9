"""config.json -> ModelConfig for the families beyond Llama/Qwen2/Mistral/GPT-2, and Phi-3's fused weights.

Each mapper reads exactly the keys transformers' modeling file of that family uses, with transformers' class
defaults for keys a config.json may leave out; anything the own decoder does not implement is refused by name.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from kvc.errors import CheckpointError
from kvc.models.config import Activation, Family, ModelConfig, NormKind, NormPlacement, QkNorm

__all__ = ["FAMILY_MAPPERS", "fused_parts"]

GELU_TANH_NAMES = ("gelu_pytorch_tanh", "gelu_new", "gelu")  # Gemma configs say "gelu" and mean the tanh form

# transformers' defaults for keys a config.json may leave out.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "bos_token_id": None, "eos_token_id": None},
    "phi3": {"max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 32000},
    "gemma": {"max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "bos_token_id": 2, "eos_token_id": 1},
    "gemma2": {"max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "bos_token_id": 2, "eos_token_id": 1},
    "smollm3": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "bos_token_id": 128000,
                "eos_token_id": 128001},
    "olmo2": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "bos_token_id": None, "eos_token_id": 50279},
    "granite": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2},
    "stablelm": {"max_position_embeddings": 4096, "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 0},
}


def _common(d: dict, model_type: str, family: Family, name: str, tie_default: bool = False) -> dict[str, Any]:
    """The fields every RoPE family maps the same way."""
    from kvc.models.loaders.hf import _explicit_head_dim, _required, _rope, eos_token_ids

    defaults = _DEFAULTS[model_type]
    heads = _required(d, "num_attention_heads")
    theta, scaling = _rope(d)
    return dict(
        family=family, vocab_size=_required(d, "vocab_size"), hidden_size=_required(d, "hidden_size"),
        num_layers=_required(d, "num_hidden_layers"), num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads, intermediate_size=_required(d, "intermediate_size"),
        max_position_embeddings=d.get("max_position_embeddings") or defaults["max_position_embeddings"],
        head_dim=_explicit_head_dim(d, heads), rope_theta=theta, rope_scaling=scaling,
        norm_eps=float(d.get("rms_norm_eps", defaults.get("rms_norm_eps", 1e-6))),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", tie_default)),
        bos_token_id=d.get("bos_token_id", defaults["bos_token_id"]),
        eos_token_ids=eos_token_ids(d.get("eos_token_id", defaults["eos_token_id"])), name=name)


def _silu_only(d: dict, model_type: str) -> None:
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{model_type} config with hidden_act {act!r} is not supported; kvc's decoder uses "
                              "a gated MLP with silu for this family")


def _biases(d: dict) -> dict[str, bool]:
    """attention_bias switches q/k/v and o_proj biases together (HF Llama-style attention)."""
    bias = bool(d.get("attention_bias", False))
    return dict(attention_bias=bias, o_proj_bias=bias)


def _partial_rotary_factor(d: dict, default: float) -> float:
    """transformers 5 keeps it in rope_parameters, 4.x at the top level."""
    params = d.get("rope_parameters") or {}
    return float(params.get("partial_rotary_factor", d.get("partial_rotary_factor", default)))


def windows_from_layer_types(kinds: list, window: Optional[int], layers: int,
                             model_type: str) -> tuple[Optional[int], tuple[Optional[int], ...]]:
    """(sliding_window for every layer, per-layer windows) from HF's layer_types."""
    if len(kinds) != layers or not set(kinds) <= {"full_attention", "sliding_attention"}:
        raise CheckpointError(f"{model_type} config has layer_types {kinds!r}; expected {layers} entries of "
                              "full_attention / sliding_attention")
    if "sliding_attention" not in kinds or window is None:
        return None, ()
    if set(kinds) == {"sliding_attention"}:
        return int(window), ()
    return None, tuple(int(window) if k == "sliding_attention" else None for k in kinds)


def _qwen3(d: dict, name: str) -> ModelConfig:
    _silu_only(d, "qwen3")
    layers = d.get("num_hidden_layers", 0)
    window = d.get("sliding_window") if d.get("use_sliding_window") else None
    kinds = d.get("layer_types") or ["sliding_attention" if window is not None and i >= d.get("max_window_layers", 28)
                                     else "full_attention" for i in range(layers)]
    sliding, per_layer = windows_from_layer_types(kinds, window, layers, "qwen3")
    return ModelConfig(**_common(d, "qwen3", Family.QWEN3, name), **_biases(d), qk_norm=QkNorm.PER_HEAD,
                       sliding_window=sliding, layer_windows=per_layer)


def _phi3(d: dict, name: str) -> ModelConfig:
    _silu_only(d, "phi3")
    return ModelConfig(**_common(d, "phi3", Family.PHI3, name), sliding_window=d.get("sliding_window"),
                       partial_rotary_factor=_partial_rotary_factor(d, 1.0))


def _gemma_activation(d: dict, model_type: str) -> Activation:
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in GELU_TANH_NAMES:
        raise CheckpointError(f"{model_type} config with activation {act!r} is not supported; kvc's Gemma MLP uses "
                              "GeLU with the tanh approximation")
    return Activation.GELU_TANH


def _gemma(d: dict, name: str) -> ModelConfig:
    common = _common(d, "gemma", Family.GEMMA, name, tie_default=True)
    return ModelConfig(**common, **_biases(d), norm=NormKind.RMS_UNIT_OFFSET, activation=_gemma_activation(d, "gemma"),
                       embedding_multiplier=common["hidden_size"] ** 0.5)


def _gemma2(d: dict, name: str) -> ModelConfig:
    common = _common(d, "gemma2", Family.GEMMA2, name, tie_default=True)
    layers = common["num_layers"]
    kinds = d.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
    sliding, per_layer = windows_from_layer_types(kinds, d.get("sliding_window", 4096), layers, "gemma2")
    return ModelConfig(**common, **_biases(d), norm=NormKind.RMS_UNIT_OFFSET, norm_placement=NormPlacement.SANDWICH,
                       activation=_gemma_activation(d, "gemma2"), embedding_multiplier=common["hidden_size"] ** 0.5,
                       attention_scale=float(d.get("query_pre_attn_scalar", 256)) ** -0.5,
                       attn_logit_softcap=_positive_or_none(d.get("attn_logit_softcapping", 50.0)),
                       final_logit_softcap=_positive_or_none(d.get("final_logit_softcapping", 30.0)),
                       sliding_window=sliding, layer_windows=per_layer)


def _positive_or_none(value: Any) -> Optional[float]:
    return float(value) if value else None


def _smollm3(d: dict, name: str) -> ModelConfig:
    _silu_only(d, "smollm3")
    layers = d.get("num_hidden_layers", 0)
    interval = int(d.get("no_rope_layer_interval", 4))
    uses_rope = d.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(layers)]
    if len(uses_rope) != layers:
        raise CheckpointError(f"smollm3 config has {len(uses_rope)} no_rope_layers entries for {layers} layers")
    window = d.get("sliding_window") if d.get("use_sliding_window") else None
    kinds = d.get("layer_types") or ["sliding_attention" if window is not None and not r else "full_attention"
                                     for r in uses_rope]
    sliding, per_layer = windows_from_layer_types(kinds, window, layers, "smollm3")
    return ModelConfig(**_common(d, "smollm3", Family.SMOLLM3, name, tie_default=True), **_biases(d),
                       mlp_bias=bool(d.get("mlp_bias", False)),
                       nope_layers=tuple(i for i, r in enumerate(uses_rope) if not r),
                       sliding_window=sliding, layer_windows=per_layer)


def _olmo2(d: dict, name: str) -> ModelConfig:
    _silu_only(d, "olmo2")
    return ModelConfig(**_common(d, "olmo2", Family.OLMO2, name), **_biases(d), qk_norm=QkNorm.PROJECTION,
                       norm_placement=NormPlacement.POST)


def _granite(d: dict, name: str) -> ModelConfig:
    _silu_only(d, "granite")
    return ModelConfig(**_common(d, "granite", Family.GRANITE, name), **_biases(d),
                       mlp_bias=bool(d.get("mlp_bias", False)),
                       attention_scale=float(d.get("attention_multiplier", 1.0)),
                       embedding_multiplier=float(d.get("embedding_multiplier", 1.0)),
                       residual_multiplier=float(d.get("residual_multiplier", 1.0)),
                       logits_divisor=float(d.get("logits_scaling", 1.0)))


def _stablelm(d: dict, name: str) -> ModelConfig:
    _silu_only(d, "stablelm")
    for switch in ("qk_layernorm", "use_parallel_residual"):
        if d.get(switch):
            raise CheckpointError(f"stablelm config with {switch} is not supported (StableLM 2 12B); kvc's StableLM "
                                  "is the sequential-residual block without per-head q/k LayerNorm")
    common = _common(d, "stablelm", Family.STABLELM, name)
    common["norm_eps"] = float(d.get("layer_norm_eps", _DEFAULTS["stablelm"]["layer_norm_eps"]))
    return ModelConfig(**common, norm=NormKind.LAYER, attention_bias=bool(d.get("use_qkv_bias", False)),
                       partial_rotary_factor=_partial_rotary_factor(d, 0.25))


FAMILY_MAPPERS: dict[str, Callable[[dict, str], ModelConfig]] = {
    "qwen3": _qwen3, "phi3": _phi3, "gemma": _gemma, "gemma2": _gemma2, "smollm3": _smollm3, "olmo2": _olmo2,
    "granite": _granite, "stablelm": _stablelm,
}


# --------------------------------------------------------------------------- Phi-3's fused projections
def fused_parts(key: str, config: ModelConfig) -> list[tuple[str, slice]]:
    """Own (checkpoint-style) names and row ranges a fused Phi-3 tensor splits into; [] for other tensors."""
    if config.family is not Family.PHI3:
        return []
    d = config.resolved_head_dim
    q, kv = config.num_heads * d, config.num_kv_heads * d
    if key.endswith(".self_attn.qkv_proj.weight"):
        stem = key[: -len("qkv_proj.weight")]
        return [(stem + "q_proj.weight", slice(0, q)), (stem + "k_proj.weight", slice(q, q + kv)),
                (stem + "v_proj.weight", slice(q + kv, q + 2 * kv))]
    if key.endswith(".mlp.gate_up_proj.weight"):
        stem, inter = key[: -len("gate_up_proj.weight")], config.intermediate_size
        return [(stem + "gate_proj.weight", slice(0, inter)), (stem + "up_proj.weight", slice(inter, 2 * inter))]
    return []
