"""Tiny seeded Hugging Face decoders exported to ONNX the way optimum lays them out.

Inputs input_ids, attention_mask, position_ids, past_key_values.{i}.key/value; outputs logits,
present.{i}.key/value; dynamic batch / sequence / past. Both torch exporters are supported:
"torchscript" (torch.onnx.export(dynamo=False)) and "dynamo" (torch.export based), opset 18
so the passes have to upgrade and fuse.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

ARCHS = ("llama", "qwen2", "mistral", "gpt2")
# Families beyond those (issue #12's list): q/k norms (qwen3, olmo2), fused qkv / gate_up and partial rotary
# (phi3, stablelm), embedding scale (gemma), multipliers (granite), NoPE layers (smollm3). Gemma2 (a window on
# alternate layers) is refused by name and tested as such.
MORE_FAMILIES = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=16)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(num_key_value_heads=2, pad_token_id=0)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(num_key_value_heads=2, head_dim=16)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(num_key_value_heads=2, head_dim=16, sliding_window=8)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(num_key_value_heads=2)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(num_key_value_heads=2)),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(num_key_value_heads=2)),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(num_key_value_heads=2, pad_token_id=0)),
}
EXPORTERS = ("torchscript", "dynamo")
OPSET = 18
_LAYERS, _HIDDEN, _HEADS, _VOCAB, _POSITIONS = 2, 64, 4, 128, 256
MISTRAL_WINDOW = 8


@dataclass(frozen=True)
class HfExport:
    path: Path
    arch: str
    num_layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int

    @property
    def is_llama_family(self) -> bool:
        return self.arch != "gpt2"


def tiny_hf_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised (seeded) 2-layer model; GQA for the Llama family, MQA for Qwen2."""
    import transformers as tf

    common = dict(vocab_size=_VOCAB, hidden_size=_HIDDEN, num_hidden_layers=_LAYERS, num_attention_heads=_HEADS,
                  max_position_embeddings=_POSITIONS, intermediate_size=128)
    if arch == "llama":
        config = tf.LlamaConfig(num_key_value_heads=2, **common)
        cls = tf.LlamaForCausalLM
    elif arch == "qwen2":
        config = tf.Qwen2Config(num_key_value_heads=1, **common)
        cls = tf.Qwen2ForCausalLM
    elif arch == "mistral":
        # HF's sliding-window cache crops past/present to window-1 tokens (kvc.passes.cache_crop): a
        # window shorter than the test prompts, so compiled graphs are checked past it.
        config = tf.MistralConfig(num_key_value_heads=2, sliding_window=MISTRAL_WINDOW, **common)
        cls = tf.MistralForCausalLM
    elif arch in MORE_FAMILIES:
        config_cls, model_cls, extra = MORE_FAMILIES[arch]
        config, cls = getattr(tf, config_cls)(**common, **extra), getattr(tf, model_cls)
    elif arch == "gpt2":
        config = tf.GPT2Config(vocab_size=_VOCAB, n_embd=_HIDDEN, n_layer=_LAYERS, n_head=_HEADS,
                               n_positions=_POSITIONS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                               bos_token_id=0, eos_token_id=0)
        cls = tf.GPT2LMHeadModel
    else:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS + tuple(MORE_FAMILIES)}")
    torch.manual_seed(seed)
    return cls(config).eval()


class _FlatCache(torch.nn.Module):
    """forward(input_ids, attention_mask, position_ids, *flat past) -> (logits, *flat presents)."""

    def __init__(self, model: torch.nn.Module, num_layers: int):
        super().__init__()
        self.model, self.num_layers = model, num_layers

    def forward(self, input_ids, attention_mask, position_ids, *flat_past):
        from transformers import DynamicCache

        pairs = [(flat_past[2 * i], flat_past[2 * i + 1]) for i in range(self.num_layers)]
        cache = DynamicCache(ddp_cache_data=pairs, config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        layers = out.past_key_values.layers
        return (out.logits, *[t for layer in layers for t in (layer.keys, layer.values)])


def input_names(num_layers: int) -> list[str]:
    return ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def output_names(num_layers: int) -> list[str]:
    return ["logits"] + [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def export_hf(arch: str, exporter: str, directory: Path, seed: int = 0) -> HfExport:
    model = tiny_hf_model(arch, seed)
    config = model.config
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    path = Path(directory) / f"{arch}-{exporter}.onnx"
    _export(_FlatCache(model, _LAYERS).eval(), _sample_inputs(kv_heads, head_dim), path, exporter)
    return HfExport(path, arch, _LAYERS, kv_heads, head_dim, _VOCAB, _POSITIONS)


def _sample_inputs(kv_heads: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    batch, seq, past = 2, 3, 4  # nothing 0 or 1, so no dimension gets specialised
    ids = torch.zeros((batch, seq), dtype=torch.long)
    mask = torch.ones((batch, past + seq), dtype=torch.long)
    positions = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    flat = [torch.zeros(batch, kv_heads, past, head_dim) for _ in range(2 * _LAYERS)]
    return (ids, mask, positions, *flat)


def _export(module: torch.nn.Module, args: tuple, path: Path, exporter: str) -> None:
    names_in, names_out = input_names(_LAYERS), output_names(_LAYERS)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total_seq"},
                    "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
            axes.update({n: {0: "batch", 2: "past_seq"} for n in names_in[3:]})
            axes.update({n: {0: "batch", 2: "total_seq"} for n in names_out[1:]})
            torch.onnx.export(module, args, str(path), input_names=names_in, output_names=names_out,
                              dynamic_axes=axes, opset_version=OPSET, dynamo=False)
        elif exporter == "dynamo":
            dyn = torch.export.Dim.DYNAMIC
            shapes = ({0: dyn, 1: dyn}, {0: dyn, 1: dyn}, {0: dyn, 1: dyn}, tuple({0: dyn, 2: dyn} for _ in args[3:]))
            torch.onnx.export(module, args, str(path), input_names=names_in, output_names=names_out,
                              dynamic_shapes=shapes, opset_version=OPSET, dynamo=True, verbose=False,
                              optimize=False, external_data=False)  # canonicalize optimizes
        else:
            raise ValueError(f"unknown exporter {exporter!r}; expected one of {EXPORTERS}")
