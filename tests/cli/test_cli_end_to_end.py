"""The commands a user types: export -> compile -> run, and their errors on bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from kvc.cli.main import cli
from tests.conftest import STORIES260K, torch_greedy


def invoke(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input, catch_exceptions=False)


def test_help_is_fast_and_imports_no_heavy_module():
    code = ("import sys, kvc.cli.main as m; from click.testing import CliRunner; "
            "r = CliRunner().invoke(m.cli, ['--help']); assert r.exit_code == 0; "
            "heavy = [n for n in ('torch', 'tvm', 'onnxruntime', 'onnx') if n in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and "kvc, version" in result.output


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    assert invoke("export", "tiny", "-o", root / "m" / "model.onnx").exit_code == 0
    result = invoke("compile", root / "m" / "model.onnx", "-o", root / "tiny.kvc", "--max-seq-len", "96")
    assert result.exit_code == 0, result.output
    assert "pass kv_ring_buffer" in result.output or "ring" in result.output
    return root / "tiny.kvc"


def test_run_prompt_ids_json_matches_torch(tiny_artifact):
    from kvc.models import random_model
    from kvc.models.presets import RANDOM_PRESETS

    result = invoke("run", tiny_artifact, "--prompt-ids", "1,5,9", "-n", "12", "--ignore-eos", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert set(out) >= {"text", "token_ids", "finish_reason", "stats"}
    assert out["finish_reason"] == "length"
    assert out["token_ids"] == torch_greedy(random_model(RANDOM_PRESETS["tiny"]), [1, 5, 9], 12)


def test_run_without_a_tokenizer_prints_the_generated_ids(tiny_artifact):
    from kvc.models import random_model
    from kvc.models.presets import RANDOM_PRESETS

    result = invoke("run", tiny_artifact, "--prompt-ids", "1,5,9", "-n", "6", "--ignore-eos")
    assert result.exit_code == 0, result.output
    want = torch_greedy(random_model(RANDOM_PRESETS["tiny"]), [1, 5, 9], 6)
    assert result.stdout.strip() == ",".join(map(str, want))


def test_run_stats_and_bad_sampling_values(tiny_artifact):
    ok = invoke("run", tiny_artifact, "--prompt-ids", "1,2", "-n", "4", "--stats")
    assert ok.exit_code == 0 and "decode" in ok.output and "time to first token" in ok.output
    bad = invoke("run", tiny_artifact, "--prompt-ids", "1,2", "--top-p", "1.5")
    assert bad.exit_code != 0 and "top_p" in bad.output
    bad = invoke("run", tiny_artifact, "--prompt-ids", "1,2", "--temperature", "-1")
    assert bad.exit_code != 0 and "temperature" in bad.output


def test_compile_refuses_existing_output_and_garbage_onnx(tiny_artifact, tmp_path):
    garbage = tmp_path / "bad.onnx"
    garbage.write_bytes(b"not a protobuf at all")
    result = invoke("compile", garbage, "-o", tmp_path / "out.kvc")
    assert result.exit_code != 0 and "error:" in result.output
    assert not (tmp_path / "out.kvc").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.kvc")]


def test_export_refuses_unknown_source(tmp_path):
    result = invoke("export", "no-such-model-anywhere", "-o", tmp_path / "m.onnx")
    assert result.exit_code != 0 and result.output.count("\n") == 1
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.skipif(not STORIES260K.is_dir(), reason="../shared/models/stories260K is not present")
def test_real_checkpoint_reproduces_reference_text(tmp_path):
    """llama2.c's run.c reference (the checkpoint's README): greedy from BOS, 32 tokens."""
    reference = [403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338,
                 401, 396, 267, 337, 410, 408, 419, 292, 411, 322, 265, 282, 295, 433, 426, 385]
    assert invoke("export", STORIES260K / "stories260K.bin", "-o", tmp_path / "m" / "model.onnx").exit_code == 0
    assert invoke("compile", tmp_path / "m" / "model.onnx", "-o", tmp_path / "s.kvc",
                  "--max-seq-len", "512").exit_code == 0
    result = invoke("run", tmp_path / "s.kvc", "--prompt-ids", "1", "-n", "32", "--json")
    out = json.loads(result.output)
    assert out["token_ids"] == reference
    assert out["text"].startswith("Once upon a time, there was a little girl named Lily.")
    streamed = invoke("run", tmp_path / "s.kvc", "--prompt", "Once upon a time", "-n", "24")
    assert streamed.exit_code == 0, streamed.output
    assert streamed.output.startswith(", there was a little girl named Lily.")
