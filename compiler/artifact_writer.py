"""Assemble an artifact directory (see runtime/artifact.py for the format) atomically."""
from __future__ import annotations

import shutil
from pathlib import Path

from kvc.runtime.artifact import FORMAT_VERSION, MANIFEST, CacheSpec, EntryPoint, Manifest, hash_tree

# Files exported beside model.onnx that the runtime needs (tokenizer, generation defaults).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def tool_versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    from kvc._version import __version__

    versions = {"kvc": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        import tvm

        versions["tvm"] = tvm.__version__
    except ImportError:  # pragma: no cover - tvm is a dependency, but the ORT engine does not need it
        pass
    return versions


def copy_side_files(model_dir: Path, staging: Path) -> list[str]:
    copied = []
    for name in SIDE_FILES:
        src = model_dir / name
        if src.is_file() and not src.is_symlink():
            shutil.copyfile(src, staging / name)
            copied.append(name)
    return copied


def write_manifest(staging: Path, *, engine: str, target: str, model: dict, cache: CacheSpec,
                   entry_points: list[EntryPoint], passes: list[dict], generation: dict,
                   engine_options: dict) -> Manifest:
    manifest = Manifest(format_version=FORMAT_VERSION, engine=engine, target=target, versions=tool_versions(),
                        model=model, cache=cache, entry_points=entry_points, passes=passes,
                        generation=generation, files=hash_tree(staging), engine_options=engine_options)
    (staging / MANIFEST).write_text(manifest.to_json())
    return manifest
