"""What the model is, resolved once for `kvc compile`: every later stage takes the frozen result.

Sources, in this order (the first that says something wins):
  1. the user's options: --sliding-window, --max-seq-len (capacity), --kv-dtype, --kv-scales;
  2. --config CONFIG (an HF config.json, or a directory holding one);
  3. the graph's metadata (kvc.contract.MODEL_CONFIG_KEY, written by kvc export);
  4. config.json beside the model file (optimum and other exporters write one), else
     genai_config.json (onnxruntime-genai's builder; its window applies whichever config won);
  5. inference from the graph's shapes (enough for the manifest and the planner).
A sliding window the graph applies itself (Hugging Face's cache crops, kvc.passes.cache_crop) fills in a
config that has none, and refuses one that says another.
Generation defaults (EOS ids, BOS id, whether text gets BOS, sampling values), each key from the first
source that has it (kvc.compiler.generation_files reads the files, bounded):
  1. generation_config.json beside the model (kvc export's form or Hugging Face's);
  2. the graph's kvc.contract.GENERATION_KEY metadata (kvc export);
  3. tokenizer_config.json beside the model: eos_token / bos_token (text, mapped to ids through its
     added_tokens_decoder or tokenizer.json) and add_bos_token;
  4. genai_config.json beside the model (onnxruntime-genai's builder output);
  5. the model config resolved above (its eos_token_id / bos_token_id);
  and, when BOS is known but no source says whether text gets it, tokenizer.json's post-processor.
The chat template is not resolved here: tokenizer_config.json and chat_template.jinja are copied into the
artifact, where the runtime reads them.
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
from kvc.contract import GENERATION_KEY, INPUT_IDS, MODEL_CONFIG_KEY, PAST_RE, POSITION_IDS, KvDtype, past_name
from kvc.errors import GraphError, KvcError
from kvc.models.config import Family, ModelConfig
from kvc.passes.cache_crop import graph_crop_windows
from kvc.passes.mask_windows import graph_mask_windows
from kvc.passes.kv_layout import Fp8Scales
from kvc.userfiles import parse_json

HF_CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class ModelDescription:
    config: ModelConfig  # with the user's overrides applied (e.g. its sliding_window)
    original_window: Optional[int]  # the window the input graph applies itself (the model's own)
    added_window: Optional[int]  # a window kvc applies that the input graph does not (--sliding-window, genai_config)
    config_source: str  # where the config came from, for the user
    generation: dict[str, Any]  # generation defaults (eos, bos, chat template)
    capacity: int  # ring slots per sequence
    kv_dtype: KvDtype
    fp8_scales: Optional[Fp8Scales]  # static fp8 scales; None: dynamic (or not fp8)

    @property
    def sliding_window(self) -> Optional[int]:
        """One window for every layer (None: full attention, or per-layer windows)."""
        return self.config.sliding_window

    @property
    def layer_windows(self) -> tuple[Optional[int], ...]:
        """Each layer's window where the layers differ (Gemma2), else () (ModelConfig allows only one of the two)."""
        return tuple(self.config.layer_windows)

    @property
    def max_positions(self) -> int:
        return self.config.max_position_embeddings


def describe_model(model: ir.Model, model_dir: Path, options: CompileOptions) -> ModelDescription:
    """Resolve the model description in the documented order (module docstring)."""
    config, source = model_config_for(model, options.config_path, model_dir)
    config, source = _with_graph_window(config, source, model)
    genai = read_genai_config(model_dir)  # onnxruntime-genai builder output: its window lives there
    # A builder graph never applies a window itself (import_ort_genai refuses in-graph windows): kvc adds it.
    original_window = config.sliding_window if genai is None else None
    if genai is not None:
        config, source = apply_genai_config(config, source, genai)
    added_window = config.sliding_window if genai is not None else None
    if options.sliding_window is not None:
        added_window = options.sliding_window
        # one window for every layer, as the option says (it replaces per-layer windows too)
        config = dataclasses.replace(config, sliding_window=options.sliding_window, layer_windows=())
        source += f"; sliding window {options.sliding_window} from --sliding-window"
    capacity = options.capacity_for(config.max_position_embeddings)
    return ModelDescription(config=config, original_window=original_window, added_window=added_window,
                            config_source=source,
                            generation=_generation(model_dir, model, config, genai),
                            capacity=capacity,
                            kv_dtype=options.kv_dtype, fp8_scales=_read_scales(options.kv_scales))


def _with_graph_window(config: ModelConfig, source: str, model: ir.Model) -> tuple[ModelConfig, str]:
    """The windows a graph applies by cropping its caches (kvc.passes.cache_crop) or, in a graph from another
    exporter that crops nothing, in its attention masks (kvc.passes.mask_windows) are the model's own: a config
    that says nothing takes them, one that says other windows is the wrong config."""
    found, how = graph_crop_windows(model), "crops its caches to windows of {} (cached positions kept + 1)"
    if found.window is None and not found.layer_windows and MODEL_CONFIG_KEY not in model.metadata_props:
        found = graph_mask_windows(model, config.max_position_embeddings) or found
        how = "masks keys outside windows of {} (its masks evaluated at sample lengths)"
    if found.window is None and not found.layer_windows:
        return config, source
    said = tuple(config.window_for_layer(i) for i in range(config.num_layers))
    graph = found.layer_windows or (found.window,) * config.num_layers
    if said == graph:
        return config, source
    if config.sliding_window is not None or config.layer_windows:
        raise GraphError(f"{source} says sliding window(s) {_windows_text(said)} but the graph "
                         f"{how.format(_windows_text(graph))}; pass the config.json of this model")
    return (dataclasses.replace(config, sliding_window=found.window, layer_windows=found.layer_windows),
            f"{source}; sliding window {_windows_text(graph)} from the graph")


def _windows_text(windows: tuple[Optional[int], ...]) -> str:
    if len(set(windows)) == 1:
        return str(windows[0])
    return "per layer " + ", ".join("full" if w is None else str(w) for w in windows)


def model_config_for(model: ir.Model, config_path: Path | None,
                     model_dir: Path | None = None) -> tuple[ModelConfig, str]:
    """(config, where it came from): --config, export metadata, config.json beside the model, the graph."""
    if config_path is not None:
        return _hf_config(config_path / HF_CONFIG_FILE if config_path.is_dir() else config_path, model)
    if MODEL_CONFIG_KEY in model.metadata_props:
        return ModelConfig.from_dict(json.loads(model.metadata_props[MODEL_CONFIG_KEY])), "kvc export metadata"
    if model_dir is not None and (model_dir / HF_CONFIG_FILE).is_file():
        return _hf_config(model_dir / HF_CONFIG_FILE, model)
    genai = read_genai_config(model_dir) if model_dir is not None else None
    if genai is not None:
        return config_from_genai(model, genai), f"{GENAI_CONFIG_FILE} beside the model"
    return infer_config(model), "inferred from the graph (pass --config config.json for exact values)"


def _hf_config(path: Path, model: ir.Model) -> tuple[ModelConfig, str]:
    """Any decoder's config.json (kvc.compiler.decoder_config), checked against the graph's cache inputs."""
    from kvc.compiler.decoder_config import compile_config_from_hf_dict
    from kvc.errors import CheckpointError
    from kvc.userfiles import read_user_json

    raw = read_user_json(path, "model config", error=CheckpointError)  # bounded: --config is a user file
    config, generic_because = compile_config_from_hf_dict(raw, path.parent.name, str(path))
    _check_cache_geometry(config, model, path)
    source = str(path)
    if generic_because is not None:
        source += f" (model_type {raw.get('model_type')!r} read generically, {generic_because})"
    return config, source


def _check_cache_geometry(config: ModelConfig, model: ir.Model, path: Path) -> None:
    """A config of another model would size the ring wrongly: its layers, kv heads and head dim must be the
    graph's (read off the past key inputs)."""
    pasts = {m.group(1): v for v in model.graph.inputs if (m := PAST_RE.match(v.name)) and m.group(2) == "key"}
    if not pasts:
        return  # graph_checks refuses such graphs with its own message
    first = pasts.get("0") or next(iter(pasts.values()))
    shape = list(first.shape) if first.shape is not None else []
    found = {"layers": (config.num_layers, len(pasts)),
             "kv heads": (config.num_kv_heads, shape[1] if len(shape) == 4 else None),
             "head dim": (config.resolved_head_dim, shape[3] if len(shape) == 4 else None)}
    for what, (says, graph) in found.items():
        if isinstance(graph, int) and says != graph:
            raise GraphError(f"{path} says {says} {what} but the graph's past key inputs have {graph}; pass the "
                             "config.json of this model")


def _generation(model_dir: Path, model: ir.Model, config: ModelConfig,
                genai: Optional[dict[str, Any]]) -> dict[str, Any]:
    """Generation defaults, each key from the first source that has it (module docstring)."""
    from kvc.compiler import generation_files as gf

    sources: list[tuple[dict[str, Any], str]] = []
    beside = gf.read_beside(model_dir, gf.GENERATION_FILE)
    if beside is not None:
        sources.append((gf.from_generation_config(beside), str(model_dir / gf.GENERATION_FILE)))
    if GENERATION_KEY in model.metadata_props:
        metadata = parse_json(model.metadata_props[GENERATION_KEY], "metadata", "the graph's generation",
                              GraphError)
        sources.append((gf.from_generation_config(metadata if isinstance(metadata, dict) else {}),
                        "the graph's generation metadata"))
    tok_config = gf.read_beside(model_dir, gf.TOKENIZER_CONFIG_FILE)
    if tok_config is not None:
        sources.append((gf.from_tokenizer_files(model_dir, tok_config), str(model_dir / gf.TOKENIZER_CONFIG_FILE)))
    if genai is not None:
        sources.append((gf.from_generation_config(generation_defaults(genai)), str(model_dir / GENAI_CONFIG_FILE)))
    from_config = {gf.EOS_IDS: list(config.eos_token_ids)} if config.eos_token_ids else {}
    if config.bos_token_id is not None:
        from_config[gf.BOS_ID] = config.bos_token_id
    sources.append((from_config, "the model config"))
    generation: dict[str, Any] = {}
    for found, where in sources:
        gf.check_ids_in_vocab(found, config.vocab_size, where)
        for key, value in found.items():
            generation.setdefault(key, value)
    if gf.ADD_BOS not in generation and generation.get(gf.BOS_ID) is not None:
        adds = gf.tokenizer_adds_bos(model_dir, generation[gf.BOS_ID])
        if adds is not None:
            generation[gf.ADD_BOS] = adds
    return generation


def _read_scales(path: Path | None) -> Fp8Scales | None:
    if path is None:
        return None
    from kvc.userfiles import read_user_json

    return Fp8Scales.from_dict(read_user_json(path, "KV scales file (from kvc calibrate)"))


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
    positions = _table_indexed_by(model, POSITION_IDS)  # learned positions (GPT-2): their rows bound the context
    extra = {"max_position_embeddings": positions.shape[0]} if positions is not None \
        and isinstance(positions.shape[0], int) else {}
    return ModelConfig(family=family, vocab_size=vocab, hidden_size=hidden, num_layers=len(layers),
                       num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                       intermediate_size=max(widths, default=4 * hidden), name="inferred", **extra)


_INDEX_PASSTHROUGH = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "Identity")  # token ids stay token ids


def _embedding_table(model: ir.Model) -> ir.Value:
    table = _table_indexed_by(model, INPUT_IDS)
    if table is None:
        raise GraphError("cannot find the token embedding (a Gather of input_ids); pass --config config.json")
    return table


def _table_indexed_by(model: ir.Model, input_name: str) -> ir.Value | None:
    """The 2-D table a Gather reads with this graph input (GPT-2's export flattens the ids first)."""
    ids = next((v for v in model.graph.inputs if v.name == input_name), None)
    frontier = [ids] if ids is not None else []
    while frontier:
        value = frontier.pop()
        for node, index in value.uses():
            table = node.inputs[0]
            if node.op_type == "Gather" and index == 1 and table is not None and table.shape is not None \
                    and len(table.shape) == 2:
                return table
            if node.op_type in _INDEX_PASSTHROUGH and index == 0:
                frontier.extend(node.outputs)
    return None


def _query_heads(model: ir.Model) -> int | None:
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "Attention":
            q = node.inputs[0]
            if "q_num_heads" in node.attributes:
                return node.attributes["q_num_heads"].as_int()
            if q is not None and q.shape is not None and len(q.shape) == 4 and isinstance(q.shape[1], int):
                return q.shape[1]
    return None
