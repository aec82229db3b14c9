"""What the model is, resolved once for `kvc compile`: every later stage takes the frozen result.

Sources, in this order (the first that says something wins):
  1. the user's options: --sliding-window, --max-seq-len (capacity), --kv-dtype, --kv-scales;
  2. --config CONFIG (an HF config.json, or a directory holding one);
  3. the graph's metadata (kvc.contract.MODEL_CONFIG_KEY, written by kvc export);
  4. config.json beside the model file (optimum and other exporters write one);
  5. inference from the graph's shapes (enough for the manifest and the planner).
Generation defaults: generation_config.json beside the model, else the graph's
kvc.contract.GENERATION_KEY metadata, else none.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import onnx_ir as ir

from kvc.compiler.options import CompileOptions
from kvc.compiler.ortgenai_config import (GENAI_CONFIG_FILE, apply_genai_config, config_from_genai,
                                          generation_defaults, read_genai_config)
from kvc.contract import GENERATION_KEY, INPUT_IDS, MODEL_CONFIG_KEY, PAST_RE, KvDtype, past_name
from kvc.errors import GraphError, KvcError
from kvc.models.config import Family, ModelConfig
from kvc.passes.kv_layout import Fp8Scales

HF_CONFIG_FILE = "config.json"
GENERATION_FILE = "generation_config.json"


@dataclass(frozen=True)
class ModelDescription:
    config: ModelConfig  # with the user's overrides applied (e.g. its sliding_window)
    config_source: str  # where the config came from, for the user
    generation: dict[str, Any]  # generation defaults (eos, bos, chat template)
    capacity: int  # ring slots per sequence
    kv_dtype: KvDtype
    fp8_scales: Optional[Fp8Scales]  # static fp8 scales; None: dynamic (or not fp8)

    @property
    def sliding_window(self) -> Optional[int]:
        return self.config.sliding_window

    @property
    def max_positions(self) -> int:
        return self.config.max_position_embeddings


def describe_model(model: ir.Model, model_dir: Path, options: CompileOptions) -> ModelDescription:
    """Resolve the model description in the documented order (module docstring)."""
    config, source = model_config_for(model, options.config_path, model_dir)
    genai = read_genai_config(model_dir)  # onnxruntime-genai builder output: its window lives there
    if genai is not None:
        config, source = apply_genai_config(config, source, genai)
    if options.sliding_window is not None:
        config = dataclasses.replace(config, sliding_window=options.sliding_window)
        source += f"; sliding window {options.sliding_window} from --sliding-window"
    capacity = options.capacity_for(config.max_position_embeddings)
    blockers = config.ring_buffer_blockers(capacity)
    if blockers:
        raise GraphError(blockers[0])
    generation = _generation(model_dir, model) or (generation_defaults(genai) if genai is not None else {})
    return ModelDescription(config=config, config_source=source, generation=generation,
                            capacity=capacity,
                            kv_dtype=options.kv_dtype, fp8_scales=_read_scales(options.kv_scales))


def model_config_for(model: ir.Model, config_path: Path | None,
                     model_dir: Path | None = None) -> tuple[ModelConfig, str]:
    """(config, where it came from): --config, export metadata, config.json beside the model, the graph."""
    if config_path is not None:
        return _hf_config(config_path / HF_CONFIG_FILE if config_path.is_dir() else config_path)
    if MODEL_CONFIG_KEY in model.metadata_props:
        return ModelConfig.from_dict(json.loads(model.metadata_props[MODEL_CONFIG_KEY])), "kvc export metadata"
    if model_dir is not None and (model_dir / HF_CONFIG_FILE).is_file():
        return _hf_config(model_dir / HF_CONFIG_FILE)
    genai = read_genai_config(model_dir) if model_dir is not None else None
    if genai is not None:
        return config_from_genai(model, genai), f"{GENAI_CONFIG_FILE} beside the model"
    return infer_config(model), "inferred from the graph (pass --config config.json for exact values)"


def _hf_config(path: Path) -> tuple[ModelConfig, str]:
    from kvc.errors import CheckpointError
    from kvc.models.loaders.hf import config_from_hf_dict
    from kvc.userfiles import read_user_json

    raw = read_user_json(path, "model config", error=CheckpointError)  # bounded: --config is a user file
    return config_from_hf_dict(raw, name=path.parent.name), str(path)


def _generation(model_dir: Path, model: ir.Model) -> dict[str, Any]:
    path = model_dir / GENERATION_FILE
    if path.is_file():
        return json.loads(path.read_text())
    raw = model.metadata_props.get(GENERATION_KEY)
    return json.loads(raw) if raw else {}


def _read_scales(path: Path | None) -> Fp8Scales | None:
    if path is None:
        return None
    try:
        return Fp8Scales.from_dict(json.loads(Path(path).read_text()))
    except (OSError, json.JSONDecodeError) as exc:
        raise KvcError(f"cannot read KV scales from {path} ({exc}); produce them with kvc calibrate") from None


def infer_config(model: ir.Model) -> ModelConfig:
    """Enough of a ModelConfig for the manifest and the planner, read off the graph's shapes."""
    layers = sorted(int(m.group(1)) for v in model.graph.inputs if (m := PAST_RE.match(v.name)) and m.group(2) == "key")
    if not layers:
        raise GraphError(f"graph has no {past_name('{i}', 'key')} inputs: export it with past key/values "
                         "(kvc export, or optimum's 'text-generation-with-past' task)")
    first = past_name(0, "key")
    past = next(v for v in model.graph.inputs if v.name == first)
    kv_heads, head_dim = past.shape[1], past.shape[3]
    if not isinstance(kv_heads, int) or not isinstance(head_dim, int):
        raise GraphError(f"{first} must have static kv_heads and head_dim dimensions")
    embedding = _embedding_table(model)
    vocab, hidden = embedding.shape[0], embedding.shape[1]
    heads = _query_heads(model) or hidden // head_dim
    ops = {n.op_type for n in model.graph.all_nodes()}
    family = Family.LLAMA if "RMSNormalization" in ops or "RotaryEmbedding" in ops else Family.GPT2
    widths = [d for v in model.graph.initializers.values() if v.shape is not None and len(v.shape) == 2
              for d in v.shape if isinstance(d, int) and d not in (vocab, hidden)]
    return ModelConfig(family=family, vocab_size=vocab, hidden_size=hidden, num_layers=len(layers),
                       num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                       intermediate_size=max(widths, default=4 * hidden), name="inferred")


def _embedding_table(model: ir.Model) -> ir.Value:
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "Gather" and len(node.inputs) > 1 and node.inputs[1] is not None \
                and node.inputs[1].name == INPUT_IDS and node.inputs[0] is not None \
                and node.inputs[0].shape is not None and len(node.inputs[0].shape) == 2:
            return node.inputs[0]
    raise GraphError("cannot find the token embedding (a Gather of input_ids); pass --config config.json")


def _query_heads(model: ir.Model) -> int | None:
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "Attention":
            q = node.inputs[0]
            if "q_num_heads" in node.attributes:
                return node.attributes["q_num_heads"].as_int()
            if q is not None and q.shape is not None and len(q.shape) == 4 and isinstance(q.shape[1], int):
                return q.shape[1]
    return None
