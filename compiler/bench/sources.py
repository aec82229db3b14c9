"""What SOURCE names, and the engines to open for it.

SOURCE is one of
  * an artifact directory (manifest.json inside): only that engine is benchmarked;
  * an ONNX file from `kvc export` (concat form): ort-concat runs on it, the kvc engines are
    compiled from it; the torch baseline needs the model itself and is reported unavailable;
  * a model source (preset id such as llama-100m, or what `kvc export` accepts): the model is
    built once, exported, and every engine runs the same weights.
Exports and artifacts go to the work directory (temporary unless --work-dir keeps them).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kvc.compiler.bench.bandwidth import has_per_token_scales
from kvc.compiler.bench.options import BASELINE_KV_DTYPE, BenchConfig, EngineName
from kvc.compiler.bench.runners import Runner
from kvc.contract import ScaleKind, WeightDtype
from kvc.errors import KvcError
from kvc.models.config import ModelConfig
from kvc.models.loaders.source_kind import SourceKind, resolve_source


@dataclass
class EngineSlot:
    """One line of the comparison: an engine at a cache dtype, opened (built, loaded) on demand."""

    engine: EngineName
    kv_dtype: str
    open: Callable[[], Runner]
    per_token_scales: bool = False
    capacity: int | None = None  # preallocated cache slots (None: the concat baselines grow theirs)
    show_capacity: bool = False  # several capacities compared: the label names this one
    weights: WeightDtype = WeightDtype.FP32  # kvc engines: compile --weights

    @property
    def row_engine(self) -> str:
        """The engine column of its rows: the engine, and its weight precision when not fp32."""
        return self.engine.value + ("" if self.weights is WeightDtype.FP32 else f" w-{self.weights.value}")

    @property
    def label(self) -> str:
        tail = f"/c{self.capacity}" if self.show_capacity else ""
        weights = "" if self.weights is WeightDtype.FP32 else f"/w-{self.weights.value}"
        return f"{self.engine.value}/{self.kv_dtype}{weights}{tail}"


@dataclass
class BenchTarget:
    config: ModelConfig
    description: str
    slots: list[EngineSlot] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)  # slot label -> reason


def plan_source(source: str, bench: BenchConfig, work_dir: Path, note=lambda _msg: None) -> BenchTarget:
    """SOURCE (an artifact, an ONNX export, or anything `kvc export` reads: kvc.models.loaders.source_kind)."""
    found = resolve_source(source, BENCHABLE)
    if found is not None and found.kind is SourceKind.ARTIFACT:
        return _artifact_target(found.path, bench)
    if found is not None and found.kind is SourceKind.ONNX:
        path = found.path
        target = _onnx_target(path, bench)
        onnx_path, torch_model = path, None
        build_root = work_dir / f"onnx-{_file_key(path)}"
    else:
        torch_model, config = load_model_source(source, bench.seed)
        target = BenchTarget(config, f"{config.name or source} (seed {bench.seed})")
        build_root = work_dir / f"{_slug(source)}-seed{bench.seed}"
        onnx_path = export_once(torch_model, config, build_root / "model.onnx", note)
    _add_slots(target, bench, onnx_path, torch_model, build_root, note)
    return target


BENCHABLE = frozenset({SourceKind.ARTIFACT, SourceKind.ONNX, SourceKind.PRESET, SourceKind.HF, SourceKind.LLAMA2C})


def _artifact_target(path: Path, bench: BenchConfig) -> BenchTarget:
    from kvc.compiler.bench.runners import open_kvc
    from kvc.runtime.artifact import read_manifest

    manifest = read_manifest(path)
    if bench.capacity > manifest.cache.capacity:
        raise KvcError(f"artifact {path} holds {manifest.cache.capacity} tokens, but the deepest context plus "
                       f"--gen needs {bench.capacity}; lower --contexts/--gen or recompile with "
                       f"--max-seq-len {bench.capacity}")
    engine = EngineName(f"kvc-{_enum_value(manifest.engine)}")  # the manifest holds kvc.contract enums
    dtype = _enum_value(manifest.cache.dtype)
    target = BenchTarget(ModelConfig.from_dict(manifest.model), f"artifact {path}")
    target.slots.append(EngineSlot(engine, dtype,
                                   lambda: open_kvc(path, engine, dtype, bench.batch, bench.resolved_threads()),
                                   per_token_scales=_enum_value(manifest.cache.scales) == ScaleKind.PER_TOKEN.value,
                                   capacity=manifest.cache.capacity))
    return target


def _onnx_target(path: Path, bench: BenchConfig) -> BenchTarget:
    import onnx

    from kvc.models.export import read_model_config

    config = read_model_config(onnx.load(str(path), load_external_data=False))
    if config is None:
        raise KvcError(f"{path} carries no kvc model config; bench ONNX files written by `kvc export`, "
                       "or pass the model source (preset id or checkpoint) instead")
    return BenchTarget(config, f"ONNX {path}")


def _add_slots(target: BenchTarget, bench: BenchConfig, onnx_path: Path, torch_model, build_root: Path,
               note) -> None:
    threads = bench.resolved_threads()
    capacities = bench.resolved_capacities
    several = len(capacities) > 1
    for engine in bench.engines:
        if engine in (EngineName.TORCH_CONCAT, EngineName.TORCH_STATIC) and torch_model is None:
            target.unavailable[f"{engine.value}/{BASELINE_KV_DTYPE}"] = (
                "unavailable: needs the model source (preset id or checkpoint), not an ONNX file")
        elif engine is EngineName.TORCH_CONCAT:
            target.slots.append(EngineSlot(engine, BASELINE_KV_DTYPE, _opener_torch(torch_model, threads)))
        elif engine is EngineName.TORCH_STATIC:
            target.slots += [EngineSlot(engine, BASELINE_KV_DTYPE, _opener_torch_static(torch_model, threads, c),
                                        capacity=c, show_capacity=several) for c in capacities]
        elif engine is EngineName.ORT_CONCAT:
            target.slots.append(EngineSlot(engine, BASELINE_KV_DTYPE, _opener_ort_concat(onnx_path, threads)))
        else:
            target.slots += [EngineSlot(engine, dtype, _opener_kvc(onnx_path, engine, dtype, c, bench, build_root,
                                                                   note, w),
                                        per_token_scales=has_per_token_scales(dtype), capacity=c,
                                        show_capacity=several, weights=w)
                             for w in bench.weights for dtype in bench.kv_dtypes for c in capacities]


def _opener_torch(model, threads: int) -> Callable[[], Runner]:
    from kvc.compiler.bench.runners import TorchRunner

    return lambda: TorchRunner(model, threads)


def _opener_torch_static(model, threads: int, capacity: int) -> Callable[[], Runner]:
    from kvc.compiler.bench.runners import TorchStaticRunner

    return lambda: TorchStaticRunner(model, threads, capacity)


def _opener_ort_concat(onnx_path: Path, threads: int) -> Callable[[], Runner]:
    from kvc.compiler.bench.runners import OrtConcatRunner

    return lambda: OrtConcatRunner(onnx_path, threads)


def _opener_kvc(onnx_path: Path, engine: EngineName, dtype: str, capacity: int, bench: BenchConfig,
                build_root: Path, note, weights: WeightDtype = WeightDtype.FP32) -> Callable[[], Runner]:
    from kvc.compiler.bench.runners import open_kvc

    def open_() -> Runner:
        artifact = compile_once(onnx_path, engine, dtype, capacity, build_root, note, weights)
        return open_kvc(artifact, engine, dtype, bench.batch, bench.resolved_threads())

    return open_


def load_model_source(source: str, seed: int):
    """(torch model, config) for anything `kvc export` accepts (preset id, checkpoint)."""
    from kvc.models.loaders.source import load_source

    loaded = load_source(source, seed=seed)
    return loaded.model.eval(), loaded.config


def export_once(model, config: ModelConfig, onnx_path: Path, note) -> Path:
    """The concat-form export, reused when the work directory already has it."""
    from kvc.fsutil import atomic_files
    from kvc.models.export import export_onnx

    if not onnx_path.is_file():
        note(f"exporting {config.name or 'the model'} to {onnx_path}")
        with atomic_files(onnx_path.parent) as staging:
            export_onnx(model, config, staging / onnx_path.name)
    return onnx_path


def compile_once(onnx_path: Path, engine: EngineName, kv_dtype: str, capacity: int, build_root: Path,
                 note, weights: WeightDtype = WeightDtype.FP32) -> Path:
    """Artifact for (engine, cache dtype, capacity, weights), reused when the work directory already has it."""
    from kvc.compiler.options import CompileOptions, EngineKind
    from kvc.compiler.pipeline import compile_model

    tail = "" if weights is WeightDtype.FP32 else f"-w{weights.value}"
    out = build_root / f"{engine.compile_engine}-{kv_dtype}-c{capacity}{tail}.kvc"
    if not (out / "manifest.json").is_file():
        note(f"compiling {engine.value} with a {kv_dtype} cache of {capacity} tokens")
        options = CompileOptions(engine=EngineKind(engine.compile_engine), max_seq_len=capacity, kv_dtype=kv_dtype,
                                 weights=weights)
        compile_model(onnx_path, out, options, overwrite=True, progress=lambda *_: None)
    return out


def _enum_value(value) -> str:
    return getattr(value, "value", value)


def _file_key(path: Path) -> str:
    """Short key of an ONNX file (and its external data) by path, size and modification time."""
    h = hashlib.sha256(str(path.resolve()).encode())
    for p in sorted(path.parent.glob(path.name + "*")):
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def _slug(source: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", source).strip("_")[:80] or "model"
