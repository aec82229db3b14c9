"""`kvc export` owns the files it writes beside the graph (kvc-export.json records them): a second
export replaces the first as a whole or not at all, and files it did not write are never replaced."""
from __future__ import annotations

import json
import os
import shutil

import pytest
from click.testing import CliRunner

from kvc.cli.main import cli
from tests.conftest import STORIES260K

RECORD = "kvc-export.json"


def invoke(*args):
    return CliRunner().invoke(cli, ["export", *map(str, args)])


def one_line_error(result, fragment: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert fragment in lines[0], lines[0]


needs_stories = pytest.mark.skipif(not STORIES260K.is_dir(), reason="../shared/models/stories260K is not present")


@needs_stories
def test_overwrite_with_another_model_removes_the_stale_tokenizer(tmp_path):
    out = tmp_path / "model.onnx"
    assert invoke(STORIES260K / "stories260K.bin", "-o", out).exit_code == 0
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(tmp_path))
    one_line_error(invoke("tiny", "-o", out), "--overwrite")  # refused without it, nothing changed
    assert (tmp_path / "tokenizer.json").is_file()
    assert invoke("tiny", "-o", out, "--overwrite").exit_code == 0
    # tiny has no tokenizer: the stories tokenizer beside it would pair with the wrong model
    assert sorted(os.listdir(tmp_path)) == ["generation_config.json", RECORD, "model.onnx"]
    assert json.loads((tmp_path / RECORD).read_text())["files"] == ["generation_config.json", "model.onnx"]


def test_overwrite_with_another_name_replaces_the_whole_earlier_export(tmp_path):
    assert invoke("tiny", "-o", tmp_path / "a.onnx").exit_code == 0
    one_line_error(invoke("tiny-gpt2", "-o", tmp_path / "b.onnx"), "already holds an export")
    assert invoke("tiny-gpt2", "-o", tmp_path / "b.onnx", "--overwrite").exit_code == 0
    assert sorted(os.listdir(tmp_path)) == ["b.onnx", "generation_config.json", RECORD]


@needs_stories
def test_files_kvc_did_not_write_are_never_replaced(tmp_path):
    """Exporting into a checkpoint directory that has its own tokenizer.json."""
    for name in ("stories260K.bin", "tok512.bin"):
        shutil.copyfile(STORIES260K / name, tmp_path / name)
    (tmp_path / "tokenizer.json").write_text('{"the user": "s own file"}')
    (tmp_path / "generation_config.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for extra in ([], ["--overwrite"]):
        result = invoke(tmp_path / "stories260K.bin", "-o", tmp_path / "model.onnx", *extra)
        one_line_error(result, "generation_config.json, tokenizer.json")
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before

