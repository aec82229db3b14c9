"""Hugging Face checkpoints: config.json -> ModelConfig, and safetensors weights -> the own torch model.

Only safetensors are read: pickled ``pytorch_model.bin`` files can run code when loaded, and configs asking
for remote code (``auto_map``) are refused, so nothing from a checkpoint is ever executed.
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch

from kvc.errors import CheckpointError
from kvc.models.config import Family, ModelConfig, RopeScaling, RopeScalingKind
from kvc.models.loaders import LoadedCheckpoint, fill_model
from kvc.models.loaders.hf_families import FAMILY_MAPPERS, fused_parts
from kvc.models.loaders.source_kind import HUB_ID

__all__ = ["SUPPORTED_MODEL_TYPES", "config_from_hf_dict", "load_hf_checkpoint", "resolve_hf_directory",
           "read_json_file"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")
# Files a hub download fetches: configs, tokenizer, safetensors weights; never pickles or code.
HUB_PATTERNS = ["*.json", "model*.safetensors", "chat_template.jinja"]  # not consolidated.safetensors duplicates

LLAMA_LIKE = ("llama", "mistral", "qwen2")
SUPPORTED_MODEL_TYPES = (*LLAMA_LIKE, "gpt2", *FAMILY_MAPPERS)

# transformers' defaults for keys a config.json may leave out, per model_type.
_LLAMA_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2},
    "mistral": {"max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2},
    "qwen2": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "bos_token_id": None, "eos_token_id": None},
}
_GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # the tanh approximation the own GPT-2 uses


# --------------------------------------------------------------------------- config.json -> ModelConfig
def config_from_hf_dict(d: dict, name: str = "") -> ModelConfig:
    """Map a Hugging Face config.json (SUPPORTED_MODEL_TYPES) onto ModelConfig."""
    if d.get("auto_map"):
        raise CheckpointError(f"config.json of {name or 'this checkpoint'} asks for remote code (auto_map); kvc "
                              "never runs checkpoint code: use a checkpoint of a supported architecture "
                              f"({', '.join(SUPPORTED_MODEL_TYPES)})")
    model_type = d.get("model_type")
    try:
        if model_type in LLAMA_LIKE:
            return _llama_like_config(d, model_type, name)
        if model_type == "gpt2":
            return _gpt2_config(d, name)
        if model_type in FAMILY_MAPPERS:
            return FAMILY_MAPPERS[model_type](d, name)
    except (TypeError, ValueError, KeyError) as exc:  # a value of the wrong type, e.g. a string for a number
        raise CheckpointError(f"config.json of {name or 'this checkpoint'} has a malformed value ({exc!r}); the "
                              "file is damaged") from None
    raise CheckpointError(f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
                          " (SmolLM, TinyLlama and Llama 2/3 are model_type llama)")


def _llama_like_config(d: dict, model_type: str, name: str) -> ModelConfig:
    defaults = _LLAMA_DEFAULTS[model_type]
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{model_type} config with hidden_act {act!r} is not supported; kvc's Llama block "
                              "uses SwiGLU with silu")
    heads = _required(d, "num_attention_heads")
    theta, scaling = _rope(d)
    return ModelConfig(
        family=Family.LLAMA,
        vocab_size=_required(d, "vocab_size"),
        hidden_size=_required(d, "hidden_size"),
        num_layers=_required(d, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        intermediate_size=_required(d, "intermediate_size"),
        max_position_embeddings=d.get("max_position_embeddings") or defaults["max_position_embeddings"],
        head_dim=_explicit_head_dim(d, heads),
        norm_eps=float(d.get("rms_norm_eps", defaults["rms_norm_eps"])),
        rope_theta=theta,
        rope_scaling=scaling,
        # Qwen2 always has q/k/v biases (its config has no switch); Mistral never has.
        attention_bias=True if model_type == "qwen2" else model_type == "llama" and bool(d.get("attention_bias")),
        o_proj_bias=model_type == "llama" and bool(d.get("attention_bias")),
        mlp_bias=model_type == "llama" and bool(d.get("mlp_bias")),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        sliding_window=_sliding_window(d, model_type),
        bos_token_id=d.get("bos_token_id", defaults["bos_token_id"]),
        eos_token_ids=eos_token_ids(d.get("eos_token_id", defaults["eos_token_id"])),
        name=name,
    )


def _gpt2_config(d: dict, name: str) -> ModelConfig:
    act = d.get("activation_function", "gelu_new")
    if act not in _GPT2_ACTIVATIONS:
        raise CheckpointError(f"GPT-2 config with activation_function {act!r} is not supported; "
                              f"supported: {', '.join(_GPT2_ACTIVATIONS)}")
    if d.get("scale_attn_by_inverse_layer_idx") or d.get("scale_attn_weights") is False:
        raise CheckpointError("GPT-2 config with scale_attn_by_inverse_layer_idx or without scale_attn_weights is "
                              "not supported; kvc scales attention by 1/sqrt(head_dim) only")
    if d.get("tie_word_embeddings") is False:
        raise CheckpointError("GPT-2 config with an untied lm_head (tie_word_embeddings false) is not supported")
    hidden = _required(d, "n_embd")
    heads = _required(d, "n_head")
    return ModelConfig(
        family=Family.GPT2,
        vocab_size=_required(d, "vocab_size"),
        hidden_size=hidden,
        num_layers=_required(d, "n_layer"),
        num_heads=heads,
        num_kv_heads=heads,
        intermediate_size=d.get("n_inner") or 4 * hidden,
        max_position_embeddings=d.get("n_positions") or d.get("n_ctx") or 1024,
        norm_eps=float(d.get("layer_norm_epsilon", 1e-5)),
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=True,
        bos_token_id=d.get("bos_token_id", 50256),
        eos_token_ids=eos_token_ids(d.get("eos_token_id", 50256)),
        name=name,
    )


def _explicit_head_dim(d: dict, heads: int) -> Optional[int]:
    """head_dim only when it differs from hidden/heads: transformers 5 writes the default out, 4.x did not."""
    head_dim = d.get("head_dim")
    return None if head_dim is None or head_dim * heads == d.get("hidden_size") else int(head_dim)


def _required(d: dict, key: str) -> int:
    value = d.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise CheckpointError(f"config.json lacks an integer {key!r} (got {value!r}); the checkpoint's config is "
                              "incomplete or not a decoder language model")
    return value


def eos_token_ids(value: Any) -> tuple[int, ...]:
    """eos_token_id in config.json / generation_config.json is an int, a list of ints, or null."""
    if value is None:
        return ()
    return (int(value),) if isinstance(value, int) else tuple(int(v) for v in value)


def _rope(d: dict) -> tuple[float, Optional[RopeScaling]]:
    """(theta, scaling) from transformers 5's rope_parameters or the older rope_theta + rope_scaling."""
    params = d.get("rope_parameters") or {}
    if any(isinstance(v, dict) for v in params.values()):
        raise CheckpointError("config.json has per-layer-type rope_parameters; not supported for this family")
    legacy = d.get("rope_scaling") or {}
    theta = float(params.get("rope_theta") or d.get("rope_theta") or 10000.0)
    spec = params if _rope_type(params) not in (None, "default") else legacy
    kind = _rope_type(spec)
    if kind in (None, "default"):
        return theta, None
    if not isinstance(spec.get("factor"), (int, float)):
        raise CheckpointError(f"rope scaling {kind!r} in config.json has no numeric 'factor'; the file is damaged")
    if kind == "linear":
        return theta, RopeScaling(RopeScalingKind.LINEAR, factor=float(spec["factor"]))
    if kind == "llama3":
        return theta, RopeScaling(
            RopeScalingKind.LLAMA3, factor=float(spec["factor"]),
            low_freq_factor=float(spec.get("low_freq_factor", 1.0)),
            high_freq_factor=float(spec.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(spec.get("original_max_position_embeddings", 8192)))
    raise CheckpointError(f"rope scaling {kind!r} is not supported; supported: linear, llama3 (or none)")


def _rope_type(spec: dict) -> Optional[str]:
    return spec.get("rope_type", spec.get("type")) if spec else None


def _sliding_window(d: dict, model_type: str) -> Optional[int]:
    if model_type == "mistral":
        return d.get("sliding_window")
    if model_type != "qwen2" or not d.get("use_sliding_window"):
        return None
    # Qwen2 slides only in layers >= max_window_layers; kvc has one window for all layers.
    layers = _required(d, "num_hidden_layers")
    kinds = d.get("layer_types") or ["sliding_attention" if i >= d.get("max_window_layers", 28) else "full_attention"
                                     for i in range(layers)]
    if set(kinds) == {"full_attention"}:
        return None
    if set(kinds) != {"sliding_attention"}:
        raise CheckpointError("Qwen2 config slides the attention window in some layers only (max_window_layers); "
                              "kvc supports one window for all layers")
    return d.get("sliding_window")


# --------------------------------------------------------------------------- directory / hub id
def resolve_hf_directory(source: str | os.PathLike) -> Path:
    """An existing checkpoint directory, or a hub id downloaded (safetensors and json only) to the HF cache."""
    path = Path(source)
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; pass the checkpoint directory holding {CONFIG_FILE}")
        return path
    if not HUB_ID.match(str(source)):
        raise CheckpointError(f"{source} does not exist; pass a checkpoint directory or a Hugging Face Hub id "
                              "such as HuggingFaceTB/SmolLM-135M")
    return _download(str(source))


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{repo_id} is not a local path, and downloading it from the Hugging Face Hub needs "
                              "huggingface_hub: pip install 'kvc[hub]', or pass a local checkpoint directory") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except (OSError, ValueError) as exc:  # offline, unknown or gated repo, invalid id
        raise CheckpointError(f"{repo_id} is not a local path and could not be fetched from the Hugging Face Hub "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); check the id "
                              "and network access, or pass a local checkpoint directory") from None


def read_json_file(path: Path) -> dict:
    """A checkpoint's JSON object (config, tokenizer or generation config): bounded, regular files only."""
    from kvc.userfiles import read_user_json

    if not path.exists() and not path.is_symlink():
        raise CheckpointError(f"{path} is missing; a Hugging Face checkpoint directory needs it")
    return read_user_json(path, "checkpoint file", error=CheckpointError)


# --------------------------------------------------------------------------- weights
def load_hf_checkpoint(directory: str | os.PathLike) -> LoadedCheckpoint:
    """The own fp32 model for a Hugging Face checkpoint directory (or hub id), every tensor checked."""
    root = resolve_hf_directory(directory)
    raw = read_json_file(root / CONFIG_FILE)
    # A hub snapshot directory is named by its commit hash: the repo id is the better name.
    default_name = root.name if Path(directory).exists() else str(directory)
    config = config_from_hf_dict(raw, name=str(raw.get("_name_or_path") or default_name))
    files = weight_files(root)
    with contextlib.ExitStack() as stack:
        handles = {f: _open_safetensors(f, stack) for f in files}
        located = _own_names(handles, config)
        model = fill_model(config, lambda name: _read(located, name, config), located.keys(), str(root))
    return LoadedCheckpoint(config=config, model=model, path=root)


def weight_files(root: Path) -> list[Path]:
    """model.safetensors, or the shards a model.safetensors.index.json names (each kept inside ``root``)."""
    if (root / WEIGHTS_FILE).is_file():
        return [root / WEIGHTS_FILE]
    if (root / WEIGHTS_INDEX_FILE).is_file():
        return _shards(root, read_json_file(root / WEIGHTS_INDEX_FILE))
    pickles = [p for p in PICKLE_WEIGHTS if (root / p).exists()]
    if pickles:
        raise CheckpointError(f"{root} holds only PyTorch pickle weights ({pickles[0]}); kvc never unpickles "
                              f"checkpoints (they can run code): convert them to {WEIGHTS_FILE} in an environment "
                              "you trust, e.g. transformers' save_pretrained(dir, safe_serialization=True)")
    raise CheckpointError(f"{root} has neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE}; download the checkpoint's "
                          "safetensors weights")


def _shards(root: Path, index: dict) -> list[Path]:
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{root / WEIGHTS_INDEX_FILE} has no weight_map; the index file is damaged")
    shards = []
    for name in sorted(set(weight_map.values())):
        shard = root / str(name)
        # An index is data from a stranger: a shard is a plain file name, never a path out of the directory.
        # (Symlinks are fine: the hub cache links snapshot files to its blobs.)
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(f"{root / WEIGHTS_INDEX_FILE} names shard {name!r} outside the checkpoint "
                                  "directory; refusing it")
        if not shard.is_file():
            raise CheckpointError(f"shard {shard} named by {WEIGHTS_INDEX_FILE} is missing; the download is "
                                  "incomplete")
        shards.append(shard)
    return shards


def _open_safetensors(path: Path, stack: contextlib.ExitStack):
    from safetensors import SafetensorError, safe_open

    try:
        return stack.enter_context(safe_open(str(path), framework="pt"))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); it is truncated or damaged: "
                              "download it again") from None


def _own_names(handles: dict, config: ModelConfig) -> dict[str, tuple[Path, Any, str, Optional[slice]]]:
    """Own parameter name -> (file, handle, checkpoint name, rows of a fused tensor or None), dropping buffers
    and a tied lm_head copy; fused tensors (Phi-3's qkv_proj, gate_up_proj) give one entry per part."""
    located: dict[str, tuple[Path, Any, str, Optional[slice]]] = {}
    for path, handle in handles.items():
        for key in handle.keys():
            for part, rows in fused_parts(key, config) or [(key, None)]:
                own = own_parameter_name(part, config)
                if own is not None:
                    located[own] = (path, handle, key, rows)
    return located


_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.attn\.bias|\.attn\.masked_bias)$")
_LLAMA_BODY = ("embed_tokens.", "layers.", "norm.")
_GPT2_CONV1D = re.compile(r"\.(c_attn|c_proj|c_fc)\.weight$")


def own_parameter_name(key: str, config: ModelConfig) -> Optional[str]:
    """The own model's name for a checkpoint tensor, or None for tensors the model does not keep."""
    if _IGNORED.search(key) or (config.tie_word_embeddings and key == "lm_head.weight"):
        return None  # rotary tables and GPT-2 mask buffers are recomputed; a tied head is the embedding
    if config.family is Family.GPT2:
        # The original GPT-2 checkpoints were saved from GPT2Model: no "transformer." prefix.
        return key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"
    return f"model.{key}" if key.startswith(_LLAMA_BODY) else key


def _read(located: dict, name: str, config: ModelConfig) -> Optional[torch.Tensor]:
    if name not in located:
        return None
    path, handle, key, rows = located[name]
    from safetensors import SafetensorError

    try:
        tensor = handle.get_tensor(key) if rows is None else handle.get_slice(key)[rows]
    except SafetensorError as exc:
        raise CheckpointError(f"cannot read tensor {key} from {path} ({exc}); the file is damaged") from None
    if config.family is Family.GPT2 and _GPT2_CONV1D.search(name):
        tensor = tensor.t()  # HF GPT-2 Conv1D stores [in, out]; nn.Linear wants [out, in]
    return tensor
