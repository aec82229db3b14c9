"""Tampered or foreign artifacts are refused before any engine (native code) is loaded."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from kvc.errors import ArtifactError
from kvc.runtime.artifact import validate_artifact


@pytest.fixture
def artifact(compiled, tmp_path):
    dst = tmp_path / "a.kvc"
    shutil.copytree(compiled("tiny"), dst)
    return dst


def test_valid_artifact_passes(artifact):
    manifest = validate_artifact(artifact)
    assert manifest.engine == "ort" and manifest.cache.layout == "ring"
    assert "graph.onnx" in manifest.files


def test_edited_file_is_refused(artifact):
    with open(artifact / "graph.onnx", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        validate_artifact(artifact)


def test_extra_file_is_refused(artifact):
    (artifact / "lib").mkdir()
    (artifact / "lib" / "evil.so").write_bytes(b"\x7fELF")
    with pytest.raises(ArtifactError, match="not in its manifest: lib/evil.so"):
        validate_artifact(artifact)


def test_symlink_is_refused(artifact, tmp_path):
    (tmp_path / "outside.txt").write_text("x")
    os.symlink(tmp_path / "outside.txt", artifact / "link.txt")
    with pytest.raises(ArtifactError, match="symbolic link"):
        validate_artifact(artifact)


def test_path_escaping_the_directory_is_refused(artifact):
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["files"]["../outside.onnx"] = "0" * 64
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="leaves the artifact directory"):
        validate_artifact(artifact)


def test_other_format_version_is_refused(artifact):
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["format_version"] = 999
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="format version 999.*recompile"):
        validate_artifact(artifact)


def test_tampered_artifact_refused_before_engine_loads(artifact, monkeypatch):
    import kvc.runtime.model as model_mod

    def must_not_run(*args, **kwargs):
        raise AssertionError("engine constructed for a tampered artifact")

    monkeypatch.setattr(model_mod, "_make_engine", must_not_run)
    (artifact / "tokenizer.json").write_text("{}") if (artifact / "tokenizer.json").exists() else \
        (artifact / "graph.onnx").write_bytes(b"junk")
    with pytest.raises(ArtifactError):
        model_mod.load(artifact)


def test_missing_manifest_is_refused(tmp_path):
    with pytest.raises(ArtifactError, match="no manifest.json"):
        validate_artifact(tmp_path)


def test_cache_layer_windows_are_one_per_layer():
    from kvc.errors import ArtifactError
    from kvc.runtime.artifact import CacheSpec

    fields = dict(layout="ring", capacity=16, dtype="fp32", scales="none", num_layers=2, num_kv_heads=1, head_dim=8)
    cache = CacheSpec(**fields, layer_windows=[4, None])
    assert cache.layer_windows == (4, None) and cache.narrowest_window == 4
    assert CacheSpec(**fields).narrowest_window is None
    with pytest.raises(ArtifactError, match="cache.layer_windows"):
        CacheSpec(**fields, layer_windows=[4])
    with pytest.raises(ArtifactError, match="cache.layer_windows"):
        CacheSpec(**fields, layer_windows=[0, None])
