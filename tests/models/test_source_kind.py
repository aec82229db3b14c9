"""One resolver says what SOURCE names, for export, plan and bench; each accepts its own kinds."""
from __future__ import annotations

import pytest

from kvc.errors import CheckpointError
from kvc.models.loaders.source_kind import SourceKind, resolve_source

ALL = frozenset(SourceKind)


def test_each_kind_is_recognised_in_the_documented_order(tmp_path):
    artifact = tmp_path / "a.kvc"
    artifact.mkdir()
    (artifact / "manifest.json").write_text("{}")
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    (tmp_path / "m.onnx").write_bytes(b"")
    (tmp_path / "stories.bin").write_bytes(b"")
    kinds = {s: resolve_source(str(s), ALL) for s in (artifact, artifact / "manifest.json", tmp_path / "m.onnx",
                                                     checkpoint, checkpoint / "config.json", tmp_path / "stories.bin")}
    assert [r.kind for r in kinds.values()] == [SourceKind.ARTIFACT, SourceKind.ARTIFACT, SourceKind.ONNX,
                                                 SourceKind.HF, SourceKind.HF, SourceKind.LLAMA2C]
    assert kinds[checkpoint / "config.json"].path == checkpoint
    assert resolve_source("tiny", ALL).kind is SourceKind.PRESET
    assert resolve_source("Llama-2-7B", ALL).kind is SourceKind.KNOWN
    assert resolve_source("owner/name", ALL).kind is SourceKind.HF and resolve_source("owner/name", ALL).path is None


def test_a_kind_not_accepted_is_not_returned(tmp_path):
    export_kinds = frozenset({SourceKind.PRESET, SourceKind.HF, SourceKind.LLAMA2C})
    assert resolve_source("llama-2-7b", export_kinds) is None  # config only: nothing to export
    assert resolve_source(str(tmp_path / "nothing-here"), ALL) is None
    with pytest.raises(CheckpointError, match="does not exist; export a model"):
        resolve_source(str(tmp_path / "missing.onnx"), ALL)
