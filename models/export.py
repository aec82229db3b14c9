"""Export a kvc torch model to ONNX in the plain concat form with explicit past key/values.

Graph interface (all dims symbolic but layer count and widths):
  inputs  input_ids [batch, seq] int64, attention_mask [batch, total_seq] int64,
          position_ids [batch, seq] int64, past_key_values.{i}.key/value [batch, kv_heads, past_seq, head_dim]
  outputs logits [batch, seq, vocab], present.{i}.key/value [batch, kv_heads, total_seq, head_dim]
The model config travels in metadata_props["kvc.model_config"], so `kvc compile` needs nothing else.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from kvc.models import empty_past
from kvc.models.config import ModelConfig

CONFIG_KEY = "kvc.model_config"
EXPORTER_KEY = "kvc.exporter"
GENERATION_KEY = "kvc.generation"
DEFAULT_OPSET = 18  # what the TorchScript exporter writes best; the passes upgrade to 23/24
EXTERNAL_DATA_THRESHOLD = 1 << 30  # bytes of weights above which they go to model.onnx.data


@dataclass(frozen=True)
class ExportOptions:
    opset: int = DEFAULT_OPSET
    external_data: bool | None = None  # None: decide by size


def input_names(config: ModelConfig) -> list[str]:
    return ["input_ids", "attention_mask", "position_ids"] + past_names(config)


def past_names(config: ModelConfig) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(config.num_layers) for kv in ("key", "value")]


def present_names(config: ModelConfig) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(config.num_layers) for kv in ("key", "value")]


class _FlatKV(torch.nn.Module):
    """Adapts forward(..., past list) to flat positional tensors, as ONNX export needs."""

    def __init__(self, model: torch.nn.Module, num_layers: int):
        super().__init__()
        self.model, self.num_layers = model, num_layers

    def forward(self, input_ids, attention_mask, position_ids, *flat_past):
        past = [(flat_past[2 * i], flat_past[2 * i + 1]) for i in range(self.num_layers)]
        logits, presents = self.model(input_ids, attention_mask, position_ids, past)
        return (logits, *[t for kv in presents for t in kv])


def _dynamic_axes(config: ModelConfig) -> dict[str, dict[int, str]]:
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total_seq"},
            "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    axes.update({n: {0: "batch", 2: "past_seq"} for n in past_names(config)})
    axes.update({n: {0: "batch", 2: "total_seq"} for n in present_names(config)})
    return axes


def _sample_inputs(config: ModelConfig) -> tuple[torch.Tensor, ...]:
    # Trace with past > 0 and seq > 1 so no dimension is specialised to 0 or 1.
    batch, seq, past = 2, 3, 4
    ids = torch.zeros((batch, seq), dtype=torch.long)
    mask = torch.ones((batch, past + seq), dtype=torch.long)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    flat = [t for kv in empty_past(config, batch, length=past) for t in kv]
    return (ids, mask, pos, *flat)


def export_onnx(model: torch.nn.Module, config: ModelConfig, path: str | Path,
                options: ExportOptions = ExportOptions(), generation: dict | None = None) -> Path:
    """Write ``path`` (and ``path.data`` for large models). Caller handles atomicity."""
    path = Path(path)
    raw = path.with_suffix(".raw.onnx")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about constant head_dim / mask fill value
        torch.onnx.export(_FlatKV(model.eval(), config.num_layers), _sample_inputs(config), str(raw),
                          input_names=input_names(config),
                          output_names=["logits"] + present_names(config),
                          dynamic_axes=_dynamic_axes(config), opset_version=options.opset, dynamo=False)
    proto = onnx.load(str(raw), load_external_data=True)
    for f in raw.parent.glob(raw.name + "*"):
        f.unlink()
    _annotate(proto, config, generation)
    weights = sum(t.ByteSize() for t in proto.graph.initializer)
    external = options.external_data if options.external_data is not None else weights > EXTERNAL_DATA_THRESHOLD
    onnx.save(proto, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=1024)
    return path


def _annotate(proto: onnx.ModelProto, config: ModelConfig, generation: dict | None) -> None:
    from kvc._version import __version__

    meta = {CONFIG_KEY: config.to_json(), EXPORTER_KEY: f"kvc {__version__}"}
    if generation is not None:
        meta[GENERATION_KEY] = json.dumps(generation, sort_keys=True)
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "kvc"
    proto.doc_string = f"{config.name or config.family.value}: decoder with explicit past key/values (concat form)"


def read_model_config(proto: onnx.ModelProto) -> ModelConfig | None:
    for prop in proto.metadata_props:
        if prop.key == CONFIG_KEY:
            return ModelConfig.from_dict(json.loads(prop.value))
    return None
