"""Which model a graph holds: from kvc's export metadata, a user-given HF config.json, or the graph."""
from __future__ import annotations

import json
import re
from pathlib import Path

import onnx_ir as ir

from kvc.errors import GraphError
from kvc.models.config import Family, ModelConfig

CONFIG_KEY = "kvc.model_config"
_PAST_KEY = re.compile(r"past_key_values\.(\d+)\.key$")


def model_config_for(model: ir.Model, config_path: Path | None) -> tuple[ModelConfig, str]:
    """(config, where it came from). Order: --config, export metadata, inference from the graph."""
    if config_path is not None:
        from kvc.models.loaders.hf import config_from_hf_dict

        path = config_path / "config.json" if config_path.is_dir() else config_path
        return config_from_hf_dict(json.loads(path.read_text()), name=path.parent.name), str(path)
    if CONFIG_KEY in model.metadata_props:
        return ModelConfig.from_dict(json.loads(model.metadata_props[CONFIG_KEY])), "kvc export metadata"
    return infer_config(model), "inferred from the graph (pass --config config.json for exact values)"


def infer_config(model: ir.Model) -> ModelConfig:
    """Enough of a ModelConfig for the manifest and the planner, read off the graph's shapes."""
    layers = sorted(int(m.group(1)) for v in model.graph.inputs if (m := _PAST_KEY.match(v.name)))
    if not layers:
        raise GraphError("graph has no past_key_values.{i}.key inputs: export it with past key/values "
                         "(kvc export, or optimum's 'text-generation-with-past' task)")
    past = next(v for v in model.graph.inputs if v.name == "past_key_values.0.key")
    kv_heads, head_dim = past.shape[1], past.shape[3]
    if not isinstance(kv_heads, int) or not isinstance(head_dim, int):
        raise GraphError("past_key_values.0.key must have static kv_heads and head_dim dimensions")
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
                and node.inputs[1].name == "input_ids" and node.inputs[0] is not None \
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
