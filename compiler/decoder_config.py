"""`kvc compile --config` for any decoder's config.json: the fields compiling needs, whatever its model_type.

kvc export needs the whole architecture (it builds the torch model), so it maps known families only
(kvc.models.loaders.hf). Compiling does not: the graph defines the computation, and what compile takes from a
config is the cache geometry (layers, kv heads, head dim), positions, the attention window(s) and the
vocabulary and special tokens. A known family is read by its exact mapper; any other config (or a known one
whose mapper refuses an architecture detail that only export needs) is read here, and only a missing needed
field is an error. Whatever the config says, the compile check (kvc.compiler.original_check) then compares
the compiled engine with the graph.
"""
from __future__ import annotations

from typing import Any, Optional

from kvc.errors import CheckpointError
from kvc.models.config import Family, ModelConfig

# (field, the names decoders' configs use for it), first found wins.
_ALIASES = {
    "vocab_size": ("vocab_size", "padded_vocab_size"),
    "hidden_size": ("hidden_size", "n_embd", "d_model", "model_dim"),
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "num_heads": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
    "max_positions": ("max_position_embeddings", "n_positions", "max_sequence_length", "max_seq_len", "seq_length",
                      "n_ctx"),
}


def compile_config_from_hf_dict(d: dict[str, Any], name: str, where: str) -> tuple[ModelConfig, Optional[str]]:
    """(config, None) from the family's own mapper, else (config, why the generic reading was used)."""
    from kvc.models.loaders.hf import SUPPORTED_MODEL_TYPES, config_from_hf_dict

    try:
        return config_from_hf_dict(d, name), None
    except CheckpointError as exc:
        if _looks_malformed(exc):
            raise
        why = "a family kvc export does not build" if d.get("model_type") not in SUPPORTED_MODEL_TYPES else str(exc)
        return generic_decoder_config(d, name, where), why


def _looks_malformed(exc: CheckpointError) -> bool:
    """A damaged or incomplete file is the user's to fix; an unsupported family or feature is not."""
    text = str(exc)
    return "malformed value" in text or "lacks an integer" in text


def generic_decoder_config(d: dict[str, Any], name: str, where: str = "config.json") -> ModelConfig:
    """The fields compiling needs from any decoder config.json (see the module docstring)."""
    model_type = d.get("model_type") or "unknown"
    hidden = _required(d, "hidden_size", where)
    heads = _required(d, "num_heads", where)
    layers = _required(d, "num_layers", where)
    kv_heads = _integer(d, "num_key_value_heads") or _integer(d, "num_kv_heads") or \
        (1 if d.get("multi_query") else heads)
    head_dim = _integer(d, "head_dim")
    sliding, per_layer = _windows(d, layers, model_type)
    return ModelConfig(
        family=Family.LLAMA,  # descriptive only here: the compiled graph is the given one
        vocab_size=_required(d, "vocab_size", where), hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=None if head_dim is None or head_dim * heads == hidden else head_dim,
        intermediate_size=_integer(d, "intermediate_size") or _integer(d, "n_inner") or
        _integer(d, "ffn_dim") or 4 * hidden,
        max_position_embeddings=_required(d, "max_positions", where),
        sliding_window=sliding, layer_windows=per_layer,
        bos_token_id=_token(d.get("bos_token_id")), eos_token_ids=_tokens(d.get("eos_token_id")),
        name=f"{name} ({model_type})" if name else model_type)


def _windows(d: dict[str, Any], layers: int, model_type: str) -> tuple[Optional[int], tuple[Optional[int], ...]]:
    from kvc.models.loaders.hf_families import windows_from_layer_types

    window = _integer(d, "sliding_window")
    if d.get("use_sliding_window") is False or window is None:
        return None, ()
    kinds = d.get("layer_types")
    pattern = _integer(d, "sliding_window_pattern")  # Gemma3-style: every pattern-th layer is full
    if kinds is None and pattern:
        kinds = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]
    if kinds is None:
        return window, ()
    return windows_from_layer_types(list(kinds), window, layers, model_type)


def _required(d: dict[str, Any], field: str, where: str) -> int:
    for key in _ALIASES[field]:
        value = _integer(d, key)
        if value is not None:
            return value
    raise CheckpointError(f"{where} has no positive integer {_ALIASES[field][0]!r} (nor "
                          f"{', '.join(repr(k) for k in _ALIASES[field][1:])}); kvc compile needs the model's "
                          f"{field.replace('_', ' ')}: add it, or pass the model's own config.json with --config")


def _integer(d: dict[str, Any], key: str) -> Optional[int]:
    value = d.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _token(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _tokens(value: Any) -> tuple[int, ...]:
    values = value if isinstance(value, list) else [value]
    return tuple(v for v in values if _token(v) is not None)
