"""Export a kvc torch model to ONNX in the plain concat form with explicit past key/values.

Graph interface (all dims symbolic but layer count and widths):
  inputs  input_ids [batch, seq] int64, attention_mask [batch, total_seq] int64,
          position_ids [batch, seq] int64, past_key_values.{i}.key/value [batch, kv_heads, past_seq, head_dim]
  outputs logits [batch, seq, vocab], present.{i}.key/value [batch, kv_heads, total_seq, head_dim]
The model config travels in metadata_props[kvc.contract.MODEL_CONFIG_KEY], so `kvc compile` needs nothing else.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import onnx
import torch

from kvc.contract import (
    ATTENTION_MASK,
    EXPORTER_KEY,
    GENERATION_KEY,
    INPUT_IDS,
    KINDS,
    MODEL_CONFIG_KEY,
    POSITION_IDS,
    past_name,
    present_name,
)
from kvc.errors import OutputError
from kvc.models import empty_past
from kvc.models.config import ModelConfig

DEFAULT_OPSET = 18  # what the TorchScript exporter writes best; the passes upgrade to 23/24
EXTERNAL_DATA_THRESHOLD = 1 << 30  # bytes of weights above which they go to model.onnx.data


@dataclass(frozen=True)
class ExportOptions:
    opset: int = DEFAULT_OPSET
    external_data: bool | None = None  # None: decide by size


def input_names(config: ModelConfig) -> list[str]:
    return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS] + past_names(config)


def past_names(config: ModelConfig) -> list[str]:
    return [past_name(i, kind) for i in range(config.num_layers) for kind in KINDS]


def present_names(config: ModelConfig) -> list[str]:
    return [present_name(i, kind) for i in range(config.num_layers) for kind in KINDS]


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

    meta = {MODEL_CONFIG_KEY: config.to_json(), EXPORTER_KEY: f"kvc {__version__}"}
    if generation is not None:
        meta[GENERATION_KEY] = json.dumps(generation, sort_keys=True)
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "kvc"
    proto.doc_string = f"{config.name or config.family.value}: decoder with explicit past key/values (concat form)"


def read_model_config(proto: onnx.ModelProto) -> ModelConfig | None:
    for prop in proto.metadata_props:
        if prop.key == MODEL_CONFIG_KEY:
            return ModelConfig.from_dict(json.loads(prop.value))
    return None


# --------------------------------------------------------------------------- the files of one export
EXPORT_RECORD = "kvc-export.json"
SIBLING_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
MAX_RECORD_BYTES = 1 << 16


@dataclass(frozen=True)
class ExportRecord:
    """What ``kvc-export.json`` says: the graph's file name and every file the export wrote."""

    model: str
    files: tuple[str, ...]

    def to_json(self) -> str:
        return json.dumps({"kvc_export": 1, "model": self.model, "files": sorted(self.files)}, indent=2)


def export_file_names(onnx_name: str) -> tuple[str, ...]:
    """Every name an export of ``onnx_name`` may write into its directory."""
    return (onnx_name, onnx_name + ".data", *SIBLING_FILES, EXPORT_RECORD)


def read_export_record(directory: Path) -> Optional[ExportRecord]:
    """The directory's export record; None when there is none or it is not kvc's."""
    from kvc.userfiles import read_user_json

    path = directory / EXPORT_RECORD
    if path.is_symlink() or not path.is_file():
        return None
    try:
        raw = read_user_json(path, "export record", limit=MAX_RECORD_BYTES, error=OutputError)
        files = tuple(str(f) for f in raw["files"] if isinstance(f, str) and "/" not in f and f not in ("", ".", ".."))
        return ExportRecord(model=str(raw["model"]), files=files) if raw.get("kvc_export") == 1 else None
    except (OutputError, KeyError, TypeError):
        return None


def check_export_target(output: Path, overwrite: bool) -> Optional[ExportRecord]:
    """Refuse an export into ``output`` that would replace files kvc did not write or, without
    ``overwrite``, any earlier export's files; the earlier export's record (None: there is none)."""
    directory = output.parent
    if output.is_dir():
        raise OutputError(f"{output} is a directory; -o names the ONNX file to write, e.g. {output / 'model.onnx'}")
    record = read_export_record(directory)
    names = set(export_file_names(output.name)) | set(record.files if record else ())
    present = sorted(n for n in names if os.path.lexists(directory / n))
    if not present:
        return record
    if not overwrite:
        raise OutputError(f"{directory} already holds an export ({', '.join(present)}); remove it or pass "
                          "--overwrite to replace that export")
    ours = set(record.files) | {EXPORT_RECORD} if record else set()
    foreign = [n for n in present if n not in ours or not (directory / n).is_file() or (directory / n).is_symlink()]
    if foreign:
        raise OutputError(f"--overwrite will not replace {', '.join(foreign)} in {directory}: kvc export did not "
                          "write them; remove them yourself or export into another directory")
    return record


def commit_export(stage: Path, output: Path, overwrite: bool) -> ExportRecord:
    """Move the files staged in ``stage`` beside ``output`` and remove the earlier export's stale ones.

    The record always lists a superset of the kvc files present, so an interrupted commit can still be
    replaced with --overwrite later.
    """
    from kvc.fsutil import move_files, signals_deferred

    directory = output.parent
    written = tuple(sorted(p.name for p in stage.iterdir()))
    new = ExportRecord(output.name, written)
    with signals_deferred():
        previous = check_export_target(output, overwrite)  # again: the export may have taken minutes
        old = set(previous.files) if previous else set()
        _write_record(stage, directory, ExportRecord(output.name, tuple(sorted(old | set(written)))))
        move_files(stage, directory, written)
        for name in sorted(old - set(written)):
            (directory / name).unlink(missing_ok=True)
        _write_record(stage, directory, new)
    return new


def _write_record(stage: Path, directory: Path, record: ExportRecord) -> None:
    from kvc.fsutil import move_files

    (stage / EXPORT_RECORD).write_text(record.to_json(), encoding="utf-8")
    move_files(stage, directory, [EXPORT_RECORD])
