"""The compiled artifact: a directory with manifest.json, the graph, weights, tokenizer, (TVM) lib.

Loading a TVM .so runs native code, so ``validate_artifact`` checks everything it can first:
format version, tool versions, that every path stays inside the directory (no symlinks, no
absolute paths, nothing unlisted), and every file's sha256.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from kvc.errors import ArtifactError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class CacheSpec:
    layout: str  # "ring": fixed-capacity in-place ring buffer
    capacity: int
    dtype: str  # fp32 | fp16 | bf16 | int8 | fp8
    scales: str  # passes.kv_layout.ScaleKind value: "none" | "per_token" | "static_per_head"
    num_layers: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None = None


@dataclass(frozen=True)
class EntryPoint:
    name: str  # "prefill" | "decode"
    inputs: dict[str, list]  # name -> shape (ints and symbol names)
    outputs: dict[str, list]
    aliases: dict[str, str]  # output name -> input name it updates in place


@dataclass(frozen=True)
class Manifest:
    format_version: int
    engine: str  # "ort" | "tvm"
    target: str  # "cpu" | "cuda" (ort) or the TVM target kind
    versions: dict[str, str]
    model: dict[str, Any]  # ModelConfig.to_dict()
    cache: CacheSpec
    entry_points: list[EntryPoint]
    passes: list[dict[str, Any]]
    generation: dict[str, Any]
    files: dict[str, str]  # relative path -> sha256
    engine_options: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        try:
            d = dict(d)
            d["cache"] = CacheSpec(**d["cache"])
            d["entry_points"] = [EntryPoint(**e) for e in d["entry_points"]]
            return cls(**d)
        except (KeyError, TypeError) as exc:
            raise ArtifactError(f"manifest.json is malformed ({exc}); recompile the model with kvc compile") from None


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
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
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); recompile the model") from None
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version != FORMAT_VERSION:
        raise ArtifactError(f"artifact format version {version!r}, this kvc reads version {FORMAT_VERSION}; "
                            "recompile the model with this kvc")
    return Manifest.from_dict(raw)


def _check_listed_path(root: Path, rel: str) -> Path:
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or rel.startswith("\\") or ":" in rel:
        raise ArtifactError(f"artifact lists the path {rel!r}, which leaves the artifact directory; refusing to load")
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
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel != MANIFEST:
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
    if manifest.engine == "tvm":
        import tvm

        built = manifest.versions.get("tvm")
        if built != tvm.__version__:
            raise ArtifactError(f"artifact built with TVM {built}, runtime has TVM {tvm.__version__}; "
                                "recompile the model with this TVM")
    elif manifest.engine == "ort":
        import onnxruntime as ort

        built = manifest.versions.get("onnxruntime", "0")
        if _version_tuple(ort.__version__) < _version_tuple(built):
            raise ArtifactError(f"artifact built with ONNX Runtime {built}, runtime has the older "
                                f"{ort.__version__}; upgrade onnxruntime or recompile")
    else:
        raise ArtifactError(f"artifact engine {manifest.engine!r} is unknown to this kvc; recompile")


def _version_tuple(v: str) -> tuple[int, ...]:
    parts = []
    for piece in v.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def validate_artifact(root: str | os.PathLike, verify_hashes: bool = True) -> Manifest:
    root = Path(root)
    if root.is_symlink():
        raise ArtifactError(f"{root} is a symbolic link; pass the artifact directory itself")
    manifest = read_manifest(root)
    check_tree(root, manifest, verify_hashes)
    check_versions(manifest)
    return manifest
