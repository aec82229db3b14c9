"""onnxruntime-genai's genai_config.json beside a model-builder graph: what the graph itself does not say.

The builder leaves Mistral-style windows out of the graph (GroupQueryAttention's local_window_size stays
-1; onnxruntime-genai applies the window at run time from this file), so a compile that ignored it would
attend over the full context: silently wrong past the window. Read here, after the model config is
resolved (kvc.compiler.model_description): the window is added when the config has none, a config that
disagrees is refused, and so are per-layer windows. Without config.json, the sizes come from this file
(``config_from_genai``); EOS/BOS/pad too when there is no generation_config.json.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from kvc.errors import CheckpointError, GraphError
import onnx_ir as ir

from kvc.models.config import Family, ModelConfig

GENAI_CONFIG_FILE = "genai_config.json"
_GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def read_genai_config(model_dir: Path) -> dict[str, Any] | None:
    from kvc.userfiles import read_user_json

    path = model_dir / GENAI_CONFIG_FILE
    return read_user_json(path, "onnxruntime-genai config", error=CheckpointError) if path.is_file() else None


def apply_genai_config(config: ModelConfig, source: str, genai: dict[str, Any]) -> tuple[ModelConfig, str]:
    """The config with what genai_config.json adds; a GraphError where the two disagree."""
    model = genai.get("model") if isinstance(genai.get("model"), dict) else {}
    decoder = model.get("decoder") if isinstance(model.get("decoder"), dict) else {}
    changes: dict[str, Any] = {}
    window = _window(decoder)
    if window is not None and config.sliding_window is None and not config.layer_windows:
        changes["sliding_window"] = window
    elif window is not None and config.sliding_window != window:
        raise GraphError(f"{GENAI_CONFIG_FILE} gives a sliding window of {window} tokens but the model config "
                         f"({source}) says {config.sliding_window or config.layer_windows or 'none'}; pass "
                         "--sliding-window with the model's true window")
    if not changes:
        return config, source
    return config.replace(**changes), source + f"; {', '.join(sorted(changes))} from {GENAI_CONFIG_FILE}"


def generation_defaults(genai: dict[str, Any]) -> dict[str, Any]:
    model = genai.get("model") if isinstance(genai.get("model"), dict) else {}
    return {k: model[k] for k in _GENERATION_KEYS if model.get(k) is not None}


def _window(decoder: dict[str, Any]) -> int | None:
    window = decoder.get("sliding_window")
    if not isinstance(window, dict):
        return None
    size = window.get("window_size")
    if not isinstance(size, int) or size <= 0:
        return None
    if window.get("layers"):
        raise GraphError(f"{GENAI_CONFIG_FILE}: a sliding window of {size} tokens on layers {window['layers']} "
                         "only; kvc's ring holds one window for every layer: this model cannot be compiled")
    return size


def config_from_genai(model: ir.Model, genai: dict[str, Any]) -> ModelConfig:
    """The model config of a builder graph with no config.json beside it (sizes from genai_config.json, the
    MLP width from the weights); the window is added by ``apply_genai_config``."""
    section = genai.get("model") if isinstance(genai.get("model"), dict) else {}
    decoder = section.get("decoder") if isinstance(section.get("decoder"), dict) else {}
    sizes = {"vocab_size": section.get("vocab_size"), "hidden_size": decoder.get("hidden_size"),
             "num_layers": decoder.get("num_hidden_layers"), "num_heads": decoder.get("num_attention_heads"),
             "num_kv_heads": decoder.get("num_key_value_heads"), "head_dim": decoder.get("head_size"),
             "max_position_embeddings": section.get("context_length")}
    missing = [k for k, v in sizes.items() if not isinstance(v, int) or v <= 0]
    if missing:
        raise CheckpointError(f"{GENAI_CONFIG_FILE} lacks {', '.join(missing)}; pass --config with the model's "
                              "Hugging Face config.json")
    attention = {sizes["num_heads"] * sizes["head_dim"], sizes["num_kv_heads"] * sizes["head_dim"],
                 (sizes["num_heads"] + 2 * sizes["num_kv_heads"]) * sizes["head_dim"]}
    widths = [d for v in model.graph.initializers.values() if v.shape is not None and len(v.shape) == 2
              for d in v.shape if isinstance(d, int) and d not in (sizes["vocab_size"], sizes["hidden_size"])
              and d not in attention]
    # Descriptive only (manifest, planner): the compiled graph, not this field, says what the model computes.
    return ModelConfig(family=Family.LLAMA, intermediate_size=max(widths, default=4 * sizes["hidden_size"]),
                       name=f"onnxruntime-genai {section.get('type', 'model')}", **sizes)
