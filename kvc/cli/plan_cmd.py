"""`kvc plan MODEL`: KV-cache bytes, what fits in memory, and the bandwidth floor of a decode step.

MODEL is a known checkpoint id (`kvc plan --list`), a random preset, a Hugging Face config.json (or a
directory holding one), or a compiled artifact directory (its manifest supplies the cache dtype and
capacity as defaults).
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import click

from kvc.contract import KV_DTYPE_NAMES, MANIFEST_FILE, KvDtype, ScaleKind, parse_kv_dtype
from kvc.errors import ArtifactError, CheckpointError, KvcError
from kvc.models.loaders.source_kind import HF_CONFIG_FILE, SourceKind, resolve_source

if TYPE_CHECKING:  # the planner's imports (torch via kvc.models, onnx_ir) wait until a plan is made
    from kvc.tools.plan import PlanRequest
    from kvc.models.config import ModelConfig

PLANNABLE = frozenset({SourceKind.ARTIFACT, SourceKind.PRESET, SourceKind.HF, SourceKind.KNOWN})
_HF_DTYPES = {"float32": KvDtype.FP32.value, "float16": KvDtype.FP16.value, "bfloat16": KvDtype.BF16.value}
_FP8_SCALES = {"static": ScaleKind.STATIC_PER_HEAD.value, "dynamic": ScaleKind.PER_TOKEN.value}
FP32 = KvDtype.FP32.value  # presets and artifacts hold fp32 weights


@dataclass(frozen=True)
class ModelSource:
    """A resolved MODEL argument and the defaults it brings."""

    config: ModelConfig
    kind: SourceKind  # the one SOURCE resolver's kinds (models/loaders/source_kind.py)
    weights_dtype: str
    kv_dtype: str
    context: int
    kv_scales: Optional[str] = None  # ScaleKind value; None: the dtype's default


def resolve_model(model: str) -> ModelSource:
    """MODEL, resolved by the SOURCE resolver every command shares; the planner needs a config only."""
    found = resolve_source(model, PLANNABLE)
    if found is None and Path(model).exists():  # any other file is read as a config.json (bounded, checked)
        return _from_hf_config(Path(model))
    if found is None:
        from kvc.models.known_models import KNOWN_MODELS
        from kvc.models.presets import RANDOM_PRESETS

        raise _unknown_model(model, list(KNOWN_MODELS) + list(RANDOM_PRESETS))
    if found.kind is SourceKind.ARTIFACT:
        return _from_artifact(found.path)
    if found.kind is SourceKind.PRESET:
        from kvc.models.presets import RANDOM_PRESETS

        config = RANDOM_PRESETS[model]
        return ModelSource(config, SourceKind.PRESET, FP32, FP32, config.max_position_embeddings)
    if found.kind is SourceKind.KNOWN:
        from kvc.models.known_models import DEFAULT_DTYPES, KNOWN_MODELS

        key = model.lower()
        config, dtype = KNOWN_MODELS[key], DEFAULT_DTYPES[key]
        return ModelSource(config, SourceKind.KNOWN, dtype, dtype, config.max_position_embeddings)
    return _from_hf(found.path, model)


def _from_hf(path: Optional[Path], model: str) -> ModelSource:
    if path is None:  # a hub id: planning reads configs, it never downloads
        raise KvcError(f"{model} is not a local path; the planner does not download: pass its config.json "
                       "(or a directory holding one), a known id (`kvc plan --list`) or a kvc artifact")
    config_file = path if path.is_file() else path / HF_CONFIG_FILE
    if not config_file.is_file():
        raise KvcError(f"{path} holds neither {MANIFEST_FILE} (a kvc artifact) nor {HF_CONFIG_FILE} (a Hugging "
                       "Face checkpoint); point MODEL at one of those")
    return _from_hf_config(config_file)


def _unknown_model(model: str, ids: list[str]) -> KvcError:
    if "/" in model or model.endswith(".json"):
        return KvcError(f"{model} does not exist; pass a config.json, a directory holding one, or a kvc artifact")
    close = difflib.get_close_matches(model.lower(), ids, n=4, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return KvcError(f"unknown model {model!r}; {hint}list the known ids with `kvc plan --list`, "
                    "or pass a config.json or an artifact directory")


def _read_json(path: Path, what: str, error: type[KvcError]) -> dict:
    from kvc.userfiles import read_user_json

    return read_user_json(path, what, error=error)


def _from_hf_config(path: Path) -> ModelSource:
    from kvc.models.loaders.hf import config_from_hf_dict

    raw = _read_json(path, "model config", CheckpointError)
    config = config_from_hf_dict(raw, name=str(raw.get("_name_or_path") or path.parent.name))
    # transformers 4 writes "torch_dtype", 5 writes "dtype"; configs naming neither load as float32.
    dtype = _HF_DTYPES.get(str(raw.get("dtype") or raw.get("torch_dtype") or "float32"), FP32)
    return ModelSource(config, SourceKind.HF, dtype, dtype, config.max_position_embeddings)


def _from_artifact(root: Path) -> ModelSource:
    from kvc.models.config import ModelConfig

    raw = _read_json(root / MANIFEST_FILE, "artifact manifest", ArtifactError)
    try:
        config = ModelConfig.from_dict(raw["model"])
        cache = raw["cache"]
        kv_dtype, capacity = str(cache["dtype"]), int(cache["capacity"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{root / MANIFEST_FILE} lacks a usable model config or cache entry ({exc}); "
                            "recompile the model with kvc compile") from None
    # kvc exports fp32 weights, and the manifest does not record a weights dtype.
    return ModelSource(config, SourceKind.ARTIFACT, FP32, kv_dtype, capacity, _artifact_scales(root, cache))


def _artifact_scales(root: Path, cache: dict) -> Optional[str]:
    text = str(cache.get("scales") or "none").replace("-", "_")
    text = {"per_token_head": "per_token"}.get(text, text)  # older spelling in runtime/artifact.py's comment
    try:
        kind = ScaleKind(text)
    except ValueError:
        raise ArtifactError(f"{root / MANIFEST_FILE} names unknown KV scales {cache.get('scales')!r}; "
                            "recompile the model with kvc compile") from None
    return None if kind is ScaleKind.NONE else kind.value


def list_models_table():
    from rich.table import Table

    from kvc.models.known_models import DEFAULT_DTYPES, KNOWN_MODELS
    from kvc.models.presets import RANDOM_PRESETS

    table = Table(title="models kvc plan knows (or pass a config.json / artifact directory)")
    for column in ("id", "source", "parameters", "KV per token", "dtype", "max positions"):
        table.add_column(column)
    rows = [(k, c, DEFAULT_DTYPES[k]) for k, c in KNOWN_MODELS.items()]
    rows += [(k, c, FP32) for k, c in RANDOM_PRESETS.items()]
    for key, config, dtype in rows:
        per_token = config.kv_bytes_per_token(KvDtype(dtype).bytes_per_element)
        table.add_row(key, config.name if key in KNOWN_MODELS else "random preset",
                      f"{config.num_parameters() / 1e9:,.3f} B", f"{per_token:,.0f} B", dtype,
                      f"{config.max_position_embeddings:,}")
    return table


@click.command("plan")
@click.argument("model", required=False)
@click.option("--context", "-c", type=int, default=None,
              help="Tokens per sequence. Default: the artifact's capacity, else the model's max positions.")
@click.option("--batch", "-b", type=int, default=1, show_default=True, help="Sequences held at once.")
@click.option("--kv-dtype", type=click.Choice(KV_DTYPE_NAMES), default=None,
              help="KV-cache storage type. Default: the artifact's, else the model's weights dtype.")
@click.option("--fp8-scales", type=click.Choice(list(_FP8_SCALES)), default=None,
              help="fp8 only: static (calibrated, per head) or dynamic (per token per head). Default: static.")
@click.option("--weights-dtype", default=None,
              help="Weights storage type (fp32, fp16, bf16, fp8 or int8). Default: the checkpoint's published dtype (fp32 for presets, artifacts).")
@click.option("--memory", default=None, help="Device memory, e.g. 80GB (1e9 B), 80GiB, 24G (= GiB).")
@click.option("--bandwidth", default=None, help="Memory bandwidth, e.g. 3.35TB/s or 900GB/s.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--list", "list_models", is_flag=True, help="List the known model ids and presets, then exit.")
def plan(model: str | None, context: int | None, batch: int, kv_dtype: str | None, fp8_scales: str | None,
         weights_dtype: str | None, memory: str | None, bandwidth: str | None, as_json: bool,
         list_models: bool) -> None:
    """Plan the KV-cache memory of MODEL and the bandwidth floor of one decode step."""
    from rich.console import Console

    from kvc.tools.plan import make_plan, plan_table, plan_to_dict

    if list_models:
        Console().print(list_models_table())
        return
    if model is None:
        raise KvcError("give a MODEL: a known id (see `kvc plan --list`), a config.json or an artifact directory")
    source = resolve_model(model)
    request = build_request(source, context, batch, kv_dtype, fp8_scales, weights_dtype, memory, bandwidth)
    result = make_plan(request)
    if as_json:
        click.echo(json.dumps({"source": source.kind.value, **plan_to_dict(result)}, indent=2))
    else:
        Console().print(plan_table(result))


def build_request(source: ModelSource, context: int | None, batch: int, kv_dtype: str | None,
                  fp8_scales: str | None, weights_dtype: str | None, memory: str | None,
                  bandwidth: str | None) -> PlanRequest:
    from kvc.tools.plan import PlanRequest, parse_bandwidth, parse_memory, parse_weights_dtype
    dtype = parse_kv_dtype(kv_dtype or source.kv_dtype)
    if fp8_scales is not None and dtype is not KvDtype.FP8:
        raise KvcError(f"--fp8-scales applies to an fp8 cache, but the cache is {dtype.value}; "
                       "drop it or pass --kv-dtype fp8")
    if fp8_scales is not None:
        scales = _FP8_SCALES[fp8_scales]
    elif dtype.value == source.kv_dtype:
        scales = source.kv_scales  # an artifact's own scale layout
    else:
        scales = None  # the dtype's default
    return PlanRequest(config=source.config, context=context if context is not None else source.context,
                       batch=batch, kv_dtype=dtype, kv_scales=ScaleKind(scales) if scales else None,
                       weights_dtype=parse_weights_dtype(weights_dtype or source.weights_dtype),
                       memory_bytes=parse_memory(memory) if memory is not None else None,
                       bandwidth_bytes_per_s=parse_bandwidth(bandwidth) if bandwidth is not None else None)
