"""`kvc run --on-overflow slide --sink-tokens N`: tokens equal the torch sinks reference; misuse is one error line."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from kvc.cli.main import cli
from tests.runtime.sink_reference import torch_greedy_with_sinks

CAPACITY = 16


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def small_ring(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-sinks")
    assert invoke("export", "tiny", "-o", root / "m" / "model.onnx").exit_code == 0
    result = invoke("compile", root / "m" / "model.onnx", "-o", root / "tiny.kvc", "--max-seq-len", CAPACITY)
    assert result.exit_code == 0, result.output
    return root / "tiny.kvc"


def test_run_with_sink_tokens_matches_the_reference(small_ring):
    from kvc.models import random_model
    from kvc.models.presets import RANDOM_PRESETS

    result = invoke("run", small_ring, "--prompt-ids", "1,5,9,4", "-n", "30", "--ignore-eos", "--json",
                    "--on-overflow", "slide", "--sink-tokens", "4")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    expected = torch_greedy_with_sinks(random_model(RANDOM_PRESETS["tiny"]), [1, 5, 9, 4], 30, CAPACITY, 4)
    assert out["token_ids"] == expected and out["finish_reason"] == "length"


def test_sink_tokens_help_says_what_it_does():
    result = invoke("run", "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "--sink-tokens" in text and "attention sinks" in text and "no re-rotation" in text


@pytest.mark.parametrize("args, message", [
    (["--sink-tokens", "4"], "sinks only apply with --on-overflow slide"),
    (["--on-overflow", "slide", "--sink-tokens", "-2"], "sink_tokens must be >= 0, got -2"),
    (["--on-overflow", "slide", "--sink-tokens", "16"], "leaves no ring slot in the KV-cache capacity of 16"),
])
def test_sink_tokens_misuse_is_one_error_line(small_ring, args, message):
    result = invoke("run", small_ring, "--prompt-ids", "1,2,3", "-n", "4", *args)
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and result.output.startswith("error: ") and message in result.output
