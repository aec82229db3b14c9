"""The compiled artifact: a directory with manifest.json, the graph, weights, tokenizer, (TVM) lib.

Trust model. manifest.json lists every file with its sha256, but the manifest itself is not hashed:
whoever can edit it can rewrite those hashes too, so they detect corruption, not tampering. Loading
a TVM .so runs native code anyway: load only artifacts you trust. What kvc guarantees is that no
manifest value, edited or not, makes the runtime open a file outside the artifact, load native code
or start an engine on values that disagree with the files it runs:

* paths are never read from the manifest: the runtime opens fixed names (kvc.contract: graph.onnx,
  lib/<target>.so, params.safetensors, tokenizer.json), each only if listed, hashed, inside the
  directory and not a symlink; the manifest's path fields must equal those names;
* every field is parsed into a typed, frozen dataclass (enums from kvc.contract, bounded integers,
  exact key sets), then cross-checked with the others (cache names and shapes, aliases, vocab);
* before an engine starts, the values it uses are compared with the files themselves: the ORT
  graph's inputs, outputs, element types and KV-layout metadata (kvc.runtime.artifact_checks), the
  TVM params' safetensors header; external data of the graph must be a listed file.

``validate_artifact`` runs all of it; nothing native is loaded and no ONNX Runtime session is
created before it returns.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from kvc.contract import (BATCH_DIM, ENTRY_NAMES, FORMAT_VERSION, INPUT_IDS, LOGITS, MANIFEST_FILE, ORT_ENTRY,
                          PAST_LEN, POSITION_IDS, SCALE_TVM_DTYPE, TVM_TARGETS, CacheLayoutKind, EngineKind, Entry, KvDtype,
                          ScaleKind, cache_io_names, is_scale)
from kvc.errors import ArtifactError
from kvc.runtime import manifest_fields as f

MANIFEST = MANIFEST_FILE
MAX_MANIFEST_BYTES = 64 << 20  # a real manifest is a few KiB; refuse to parse anything huge
_DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class CacheSpec:
    layout: CacheLayoutKind
    capacity: int
    dtype: KvDtype
    scales: ScaleKind
    num_layers: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None = None
    layer_windows: tuple[int | None, ...] = ()  # per layer where the layers differ (None: full attention)

    @property
    def narrowest_window(self) -> int | None:
        """The narrowest window any layer applies (None: every layer attends to the whole cache)."""
        windows = [w for w in (self.sliding_window, *self.layer_windows) if w is not None]
        return min(windows) if windows else None

    def __post_init__(self) -> None:
        put = object.__setattr__
        put(self, "layout", f.choice(self.layout, CacheLayoutKind, "cache.layout"))
        put(self, "dtype", f.choice(self.dtype, KvDtype, "cache.dtype"))
        put(self, "scales", f.choice(self.scales, ScaleKind, "cache.scales"))
        for name in ("capacity", "num_layers", "num_kv_heads", "head_dim"):
            f.integer(getattr(self, name), f"cache.{name}", 1, 1 << 24)
        f.optional_integer(self.sliding_window, "cache.sliding_window", 1)
        if not isinstance(self.layer_windows, (list, tuple)) or \
                (self.layer_windows and len(self.layer_windows) != self.num_layers):
            raise f.bad("cache.layer_windows", f"expected one window (or null) per layer, {self.num_layers} in all")
        put(self, "layer_windows", tuple(f.optional_integer(w, "cache.layer_windows[]", 1) for w in self.layer_windows))
        allowed = {KvDtype.INT8: (ScaleKind.PER_TOKEN,),
                   KvDtype.FP8: (ScaleKind.PER_TOKEN, ScaleKind.STATIC_PER_HEAD)}.get(self.dtype, (ScaleKind.NONE,))
        if self.scales not in allowed:
            raise f.bad("cache.scales", f"{self.scales.value} does not go with a {self.dtype.value} cache")

    @property
    def per_token_scales(self) -> bool:
        return self.scales is ScaleKind.PER_TOKEN

    def io_names(self) -> list[tuple[str, str]]:
        """(input, output) name pairs of every cache tensor, in graph order."""
        return cache_io_names(self.num_layers, self.per_token_scales)

    def cache_inputs(self) -> list[str]:
        return [i for i, _ in self.io_names()]

    def tensor_shape(self, name: str, batch: int) -> tuple[int, int, int, int]:
        return (batch, self.num_kv_heads, self.capacity, 1 if is_scale(name) else self.head_dim)

    def storage(self, name: str) -> str:
        """TVM/DLPack dtype of a cache tensor: the cache dtype, float32 for scale rings."""
        return SCALE_TVM_DTYPE if is_scale(name) else self.dtype.tvm_dtype


@dataclass(frozen=True)
class EntryPoint:
    name: str  # kvc.contract.Entry value (TVM) or ORT_ENTRY
    inputs: dict[str, tuple]  # name -> shape (ints and symbol names)
    outputs: dict[str, tuple]
    aliases: dict[str, str]  # output name -> input name it updates in place

    def __post_init__(self) -> None:
        where = f"entry_points.{self.name}"
        f.one_of(self.name, ENTRY_NAMES + (ORT_ENTRY,), "entry_points[].name")
        for part in ("inputs", "outputs"):
            shapes = {k: f.shape(v, f"{where}.{part}.{k}") for k, v in f.mapping(getattr(self, part), where).items()}
            object.__setattr__(self, part, shapes)
        object.__setattr__(self, "aliases", f.string_map(self.aliases, f"{where}.aliases"))


class _FieldAccess:
    """options["lib"] reads a field, as code written for the former dict does (read-only)."""

    def __getitem__(self, key: str):
        if key not in {fld.name for fld in dataclasses.fields(self)}:
            raise KeyError(key)
        return getattr(self, key)


@dataclass(frozen=True)
class OrtOptions(_FieldAccess):
    graph: str  # must be kvc.contract.GRAPH_FILE; the runtime opens that fixed name
    cache_update: tuple[str, ...] = ()  # op writing each cache back (informational)

    def __post_init__(self) -> None:
        from kvc.contract import GRAPH_FILE

        f.one_of(self.graph, (GRAPH_FILE,), "engine_options.graph")
        object.__setattr__(self, "cache_update", f.string_list(self.cache_update, "engine_options.cache_update"))


@dataclass(frozen=True)
class TvmOptions(_FieldAccess):
    lib: str  # must be kvc.contract.lib_file(target)
    params: str  # must be kvc.contract.PARAMS_FILE
    target: str  # TVM target kind: llvm | cuda
    entry_params: dict[str, tuple[str, ...]]  # entry -> params.safetensors names passed after the caches
    cache_inputs: tuple[str, ...]
    llvm_cpu: str | None = None
    tuning: str | None = None

    def __post_init__(self) -> None:
        from kvc.contract import PARAMS_FILE, TUNING_DIR, lib_file

        f.one_of(self.target, TVM_TARGETS, "engine_options.target")
        f.one_of(self.lib, (lib_file(self.target),), "engine_options.lib")
        f.one_of(self.params, (PARAMS_FILE,), "engine_options.params")
        if self.llvm_cpu is not None:
            f.string(self.llvm_cpu, "engine_options.llvm_cpu", f._SYMBOL_DASH)
        if self.tuning is not None:
            f.one_of(self.tuning, (TUNING_DIR,), "engine_options.tuning")
        params = f.mapping(self.entry_params, "engine_options.entry_params")
        typed = {f.one_of(k, ENTRY_NAMES, "engine_options.entry_params"): f.string_list(v, f"engine_options.entry_params.{k}")
                 for k, v in params.items()}
        object.__setattr__(self, "entry_params", typed)
        object.__setattr__(self, "cache_inputs", f.string_list(self.cache_inputs, "engine_options.cache_inputs"))


_ORT_KEYS = {"graph"}, {"cache_update"}
_TVM_KEYS = {"lib", "params", "target", "entry_params", "cache_inputs"}, {"llvm_cpu", "tuning"}


def engine_options_for(engine: EngineKind, value: Any) -> OrtOptions | TvmOptions:
    if isinstance(value, (OrtOptions, TvmOptions)):
        return value
    if engine is EngineKind.ORT:
        return OrtOptions(**f.mapping(value, "engine_options", *_ORT_KEYS))
    return TvmOptions(**f.mapping(value, "engine_options", *_TVM_KEYS))


@dataclass(frozen=True)
class ModelLimits:
    """The model values the runtime relies on (the rest of Manifest.model is descriptive)."""
    vocab_size: int
    max_positions: int
    num_layers: int
    num_kv_heads: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @classmethod
    def of(cls, model: dict) -> "ModelLimits":
        vocab = f.integer(model.get("vocab_size"), "model.vocab_size", 1, 1 << 31)
        bos = model.get("bos_token_id")
        return cls(vocab_size=vocab,
                   max_positions=f.integer(model.get("max_position_embeddings"), "model.max_position_embeddings",
                                           1, 1 << 31),
                   num_layers=f.integer(model.get("num_layers"), "model.num_layers", 1, 1 << 24),
                   num_kv_heads=f.integer(model.get("num_kv_heads"), "model.num_kv_heads", 1, 1 << 24),
                   bos_token_id=None if bos is None else f.integer(bos, "model.bos_token_id", 0, vocab - 1),
                   eos_token_ids=f.token_ids(model.get("eos_token_ids", []), "model.eos_token_ids", vocab))


_GENERATION_IDS = ("bos_token_id", "eos_token_id", "eos_token_ids", "pad_token_id")


def _check_generation(generation: dict, vocab: int) -> None:
    for key in _GENERATION_IDS:
        if generation.get(key) is not None:
            f.token_ids(generation[key], f"generation.{key}", vocab)
    if "add_bos" in generation:
        f.boolean(generation["add_bos"], "generation.add_bos")


@dataclass(frozen=True)
class Manifest:
    format_version: int
    engine: EngineKind
    target: str  # the device the artifact was compiled for: cpu | cuda
    versions: dict[str, str]
    model: dict[str, Any]  # ModelConfig.to_dict(); what the runtime uses is typed in ``limits``
    cache: CacheSpec
    entry_points: list[EntryPoint]
    passes: list[dict[str, Any]]
    generation: dict[str, Any]
    files: dict[str, str]  # relative path -> sha256
    engine_options: OrtOptions | TvmOptions | None = None

    def __post_init__(self) -> None:
        put = object.__setattr__
        f.integer(self.format_version, "format_version", FORMAT_VERSION, FORMAT_VERSION)
        put(self, "engine", f.choice(self.engine, EngineKind, "engine"))
        f.one_of(self.target, _DEVICES, "target")
        put(self, "versions", f.string_map(self.versions, "versions"))
        put(self, "model", f.mapping(self.model, "model"))
        limits = ModelLimits.of(self.model)
        put(self, "_limits", limits)
        if not isinstance(self.cache, CacheSpec):
            put(self, "cache", CacheSpec(**f.mapping(self.cache, "cache", _CACHE_KEYS,
                                                     {"sliding_window", "layer_windows"})))
        if not isinstance(self.entry_points, list):
            raise f.bad("entry_points", "expected a list")
        put(self, "entry_points", [e if isinstance(e, EntryPoint) else
                                   EntryPoint(**f.mapping(e, "entry_points[]", _ENTRY_KEYS))
                                   for e in self.entry_points])
        if not isinstance(self.passes, list) or not all(isinstance(p, dict) for p in self.passes):
            raise f.bad("passes", "expected a list of objects")
        put(self, "generation", f.mapping(self.generation, "generation"))
        _check_generation(self.generation, limits.vocab_size)
        put(self, "files", f.sha256_map(self.files, "files"))
        if self.engine_options is not None:
            put(self, "engine_options", engine_options_for(self.engine, self.engine_options))

    @property
    def limits(self) -> ModelLimits:
        return self._limits  # type: ignore[attr-defined]

    def entry(self, name: str) -> EntryPoint:
        for e in self.entry_points:
            if e.name == name:
                return e
        raise f.bad("entry_points", f"no entry point {name!r}")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Any) -> "Manifest":
        d = f.mapping(d, "(top level)", _MANIFEST_KEYS, {"engine_options"})
        return cls(**d)


_CACHE_KEYS = {"layout", "capacity", "dtype", "scales", "num_layers", "num_kv_heads", "head_dim"}
_ENTRY_KEYS = {"name", "inputs", "outputs", "aliases"}
_MANIFEST_KEYS = {fld.name for fld in dataclasses.fields(Manifest)} - {"engine_options"}


# --- consistency between fields ------------------------------------------------------------------

def check_consistency(m: Manifest) -> None:
    """Cross-field checks: cache vs model, entry points vs cache, engine options vs both."""
    if m.engine_options is None:
        raise f.bad("engine_options", "missing")
    if (m.cache.num_layers, m.cache.num_kv_heads) != (m.limits.num_layers, m.limits.num_kv_heads):
        raise f.bad("cache", f"{m.cache.num_layers} layers x {m.cache.num_kv_heads} kv heads, but the model has "
                             f"{m.limits.num_layers} x {m.limits.num_kv_heads}")
    names = [e.name for e in m.entry_points]
    if len(set(names)) != len(names):
        raise f.bad("entry_points", f"duplicate names {names}")
    if m.engine is EngineKind.ORT:
        if names != [ORT_ENTRY]:
            raise f.bad("entry_points", f"the ORT engine has one entry point {ORT_ENTRY!r}, got {names}")
    else:
        _check_tvm_options(m, names)
    for entry in m.entry_points:
        _check_entry(m, entry)


def _check_tvm_options(m: Manifest, names: list[str]) -> None:
    eo = m.engine_options
    assert isinstance(eo, TvmOptions)
    if not {Entry.PREFILL.value, Entry.DECODE.value} <= set(names):
        raise f.bad("entry_points", f"the TVM engine needs prefill and decode, got {names}")
    if set(eo.entry_params) != set(names):
        raise f.bad("engine_options.entry_params", f"entries {sorted(eo.entry_params)} differ from {sorted(names)}")
    if list(eo.cache_inputs) != m.cache.cache_inputs():
        raise f.bad("engine_options.cache_inputs", "do not match the cache's layers and scales")
    if (eo.target == "cuda") != (m.target == "cuda"):
        raise f.bad("engine_options.target", f"{eo.target} does not match target {m.target}")


def _check_entry(m: Manifest, e: EntryPoint) -> None:
    where = f"entry_points.{e.name}"
    pairs = m.cache.io_names()
    want_in = {INPUT_IDS, POSITION_IDS, PAST_LEN} | {i for i, _ in pairs}
    want_out = {LOGITS} | {o for _, o in pairs}
    if set(e.inputs) != want_in or set(e.outputs) != want_out:
        raise f.bad(where, "inputs/outputs are not the ring-buffer graph's for this cache")
    if e.aliases != {o: i for i, o in pairs}:
        raise f.bad(f"{where}.aliases", "do not pair every cache output with its cache input")
    logits = e.outputs[LOGITS]
    if len(logits) != 3 or logits[2] != m.limits.vocab_size:
        raise f.bad(f"{where}.outputs.{LOGITS}", f"shape {list(logits)} does not end in vocab {m.limits.vocab_size}")
    for name, _ in pairs:
        for part, shapes in (("inputs", e.inputs), ("outputs", e.outputs)):
            _check_cache_shape(m.cache, name, shapes[name] if part == "inputs" else shapes[dict(pairs)[name]],
                               f"{where}.{part}")


def _check_cache_shape(cache: CacheSpec, name: str, shape: tuple, where: str) -> None:
    want = cache.tensor_shape(name, 0)
    ok = (len(shape) == 4 and isinstance(shape[0], str) and tuple(shape[1:2]) + tuple(shape[3:]) == (want[1], want[3])
          and (shape[2] == cache.capacity or isinstance(shape[2], str)))
    if not ok:
        raise f.bad(f"{where}.{name}", f"shape {list(shape)} is not [{BATCH_DIM}, {want[1]}, {cache.capacity} "
                                       f"or a symbol, {want[3]}]")


# --- files ----------------------------------------------------------------------------------------

def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file below ``root`` (the manifest excluded), keyed by POSIX relative path."""
    return {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def read_manifest(root: Path) -> Manifest:
    path = root / MANIFEST
    if not root.is_dir():
        raise ArtifactError(f"{root} is not an artifact directory; build one with `kvc compile model.onnx -o {root}`")
    if path.is_symlink() or not path.is_file():
        raise ArtifactError(f"{root} has no manifest.json; it is not a kvc artifact (build one with kvc compile)")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{path} is over {MAX_MANIFEST_BYTES >> 20} MiB, not a kvc manifest; recompile the model")
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({str(exc).splitlines()[0][:200]}); recompile the model") from None
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise ArtifactError(f"artifact format version {version!r}, this kvc reads version {FORMAT_VERSION}; "
                            "recompile the model with this kvc")
    return Manifest.from_dict(raw)


def _check_listed_path(root: Path, rel: str) -> Path:
    pure = PurePosixPath(rel)
    if (not rel or pure.is_absolute() or ".." in pure.parts or "\\" in rel or ":" in rel or "\0" in rel
            or rel == MANIFEST or pure.as_posix() != rel):
        raise ArtifactError(f"artifact lists the path {rel!r}, which leaves the artifact directory or is not a "
                            "plain relative path; refusing to load")
    return root / pure


def check_tree(root: Path, manifest: Manifest, verify_hashes: bool = True) -> None:
    """Refuse symlinks, unlisted files, missing files and (optionally) changed contents."""
    resolved_root = root.resolve()
    present = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                raise ArtifactError(f"artifact contains a symbolic link {p.relative_to(root)}; refusing to load")
        for name in filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if rel != MANIFEST:
                if not p.is_file():
                    raise ArtifactError(f"artifact contains {rel}, which is not a regular file; refusing to load")
                present.add(rel)
    listed = set(manifest.files)
    for rel in sorted(listed):
        path = _check_listed_path(root, rel)
        if not path.resolve().is_relative_to(resolved_root):
            raise ArtifactError(f"artifact path {rel!r} resolves outside the artifact directory; refusing to load")
        if rel not in present:
            raise ArtifactError(f"artifact file {rel} is missing; recompile the model")
    extra = sorted(present - listed)
    if extra:
        raise ArtifactError(f"artifact contains files not in its manifest: {', '.join(extra)}; "
                            "remove them or recompile")
    if verify_hashes:
        for rel, digest in sorted(manifest.files.items()):
            if sha256_file(root / rel) != digest:
                raise ArtifactError(f"artifact file {rel} does not match its sha256 in manifest.json "
                                    "(edited or corrupted); recompile the model")


def check_versions(manifest: Manifest) -> None:
    """The engine's native pieces must come from the versions the artifact was built with."""
    if manifest.engine is EngineKind.TVM:
        import tvm

        built = manifest.versions.get("tvm")
        if built != tvm.__version__:
            raise ArtifactError(f"artifact built with TVM {built}, runtime has TVM {tvm.__version__}; "
                                "recompile the model with this TVM")
    else:
        import onnxruntime as ort

        built = manifest.versions.get("onnxruntime", "0")
        if _version_tuple(ort.__version__) < _version_tuple(built):
            raise ArtifactError(f"artifact built with ONNX Runtime {built}, runtime has the older "
                                f"{ort.__version__}; upgrade onnxruntime or recompile")


def _version_tuple(v: str) -> tuple[int, ...]:
    parts = []
    for piece in v.split("+")[0].split(".")[:8]:
        digits = "".join(ch for ch in piece if ch.isdigit())[:12]
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def validate_artifact(root: str | os.PathLike, verify_hashes: bool = True) -> Manifest:
    """Every check above plus the engine files' own contents (kvc.runtime.artifact_checks)."""
    from kvc.runtime.artifact_checks import check_engine_files

    root = Path(root)
    if root.is_symlink():
        raise ArtifactError(f"{root} is a symbolic link; pass the artifact directory itself")
    manifest = read_manifest(root)
    check_tree(root, manifest, verify_hashes)
    check_consistency(manifest)
    check_versions(manifest)
    check_engine_files(root, manifest)
    return manifest
