"""`kvc plan` through click's CliRunner: every kind of MODEL, --json, and one-line user errors."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from kvc.cli.main import cli
from kvc.models.presets import RANDOM_PRESETS
from kvc.runtime.artifact import FORMAT_VERSION, MANIFEST, CacheSpec, Manifest

# meta-llama/Llama-2-7b-hf's config.json, as published.
LLAMA2_7B_HF = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
    "torch_dtype": "float16", "transformers_version": "4.31.0.dev0", "use_cache": True, "vocab_size": 32000,
}


def invoke(*args: str):
    return CliRunner().invoke(cli, ["plan", *args])


def plan_json(*args: str) -> dict:
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_json_output_is_one_object_with_inputs_and_results():
    d = plan_json("llama-2-7b", "--context", "4096", "--batch", "2", "--memory", "80GB",
                  "--bandwidth", "3.35TB/s")
    for key in ("weights_bytes", "kv_bytes_per_token", "kv_bytes", "max_context", "decode_floor_s",
                "total_bytes", "max_batch", "tokens_per_s_ceiling"):
        assert key in d
    assert (d["source"], d["context"], d["batch"]) == ("known", 4096, 2)
    assert (d["kv_dtype"], d["weights_dtype"]) == ("fp16", "fp16")  # Llama-2's published torch_dtype
    assert d["memory_bytes"] == 80 * 10**9 and d["bandwidth_bytes_per_s"] == 3.35e12
    assert d["kv_bytes_per_token"] == 524_288 and d["kv_bytes"] == 2 * 4096 * 524_288


def test_defaults_take_the_model_context_and_leave_limits_unset():
    d = plan_json("LLaMA-3.1-70B", "--kv-dtype", "int8")
    assert d["context"] == 131_072 and d["kv_scales"] == "per_token"
    assert d["memory_bytes"] is None and d["max_context"] is None and d["decode_floor_s"] is None


def test_fp8_dynamic_scales_flag():
    static = plan_json("llama-2-7b", "--context", "100", "--kv-dtype", "fp8")
    dynamic = plan_json("llama-2-7b", "--context", "100", "--kv-dtype", "fp8", "--fp8-scales", "dynamic")
    assert static["kv_scales"] == "static_per_head" and dynamic["kv_scales"] == "per_token"
    assert dynamic["kv_bytes_per_token"] - static["kv_bytes_per_token"] == 2 * 32 * 32 * 4


def test_a_random_preset_plans_at_fp32():
    d = plan_json("tiny", "--context", "64")
    tiny = RANDOM_PRESETS["tiny"]
    assert d["kv_bytes_per_token"] == 2 * tiny.num_layers * tiny.num_kv_heads * tiny.resolved_head_dim * 4


def test_human_table_states_both_unit_conventions():
    result = invoke("llama-2-7b", "--memory", "24G", "--bandwidth", "900GB/s")
    assert result.exit_code == 0, result.output
    for fragment in ("KV cache", "max context", "decode step floor", "GiB", "GB"):
        assert fragment in result.stdout


def test_list_shows_known_models_and_presets():
    result = invoke("--list")
    assert result.exit_code == 0, result.output
    assert "llama-2-7b" in result.stdout and "tiny-gpt2" in result.stdout


@pytest.mark.parametrize("as_directory", [False, True])
def test_a_hugging_face_config_json_plans_like_the_known_model(tmp_path, as_directory):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA2_7B_HF))
    d = plan_json(str(tmp_path if as_directory else path), "--context", "2048")
    known = plan_json("llama-2-7b", "--context", "2048")
    assert d["source"] == "hf" and d["weights_dtype"] == "fp16"
    for key in ("parameters", "weights_bytes", "kv_bytes_per_token", "kv_bytes"):
        assert d[key] == known[key]


def test_an_artifact_supplies_cache_dtype_and_capacity(tmp_path):
    config = RANDOM_PRESETS["tiny-mistral"]
    cache = CacheSpec(layout="ring", capacity=512, dtype="int8", scales="per_token", num_layers=config.num_layers,
                      num_kv_heads=config.num_kv_heads, head_dim=config.resolved_head_dim,
                      sliding_window=config.sliding_window)
    manifest = Manifest(format_version=FORMAT_VERSION, engine="ort", target="cpu", versions={},
                        model=config.to_dict(), cache=cache, entry_points=[], passes=[], generation={}, files={})
    (tmp_path / MANIFEST).write_text(manifest.to_json())
    d = plan_json(str(tmp_path))
    assert (d["source"], d["context"], d["kv_dtype"], d["kv_scales"]) == ("artifact", 512, "int8", "per_token")
    data_bytes = 2 * config.num_layers * config.num_kv_heads * config.resolved_head_dim
    assert d["kv_bytes_per_token"] == data_bytes + 2 * config.num_layers * config.num_kv_heads * 4
    assert d["cache_tokens"] == config.sliding_window  # the window (8) caps the 512-slot capacity
    overridden = plan_json(str(tmp_path), "--kv-dtype", "fp16", "--context", "4")
    assert overridden["kv_scales"] == "none" and overridden["kv_bytes_per_token"] == 2 * data_bytes


def test_a_malformed_manifest_is_a_one_line_error(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps({"model": {"family": "llama"}, "cache": {}}))
    assert_one_line_error(invoke(str(tmp_path)), "recompile")


def test_an_unknown_model_lists_close_matches_and_how_to_list():
    assert_one_line_error(invoke("llama-2-7"), "llama-2-7b", "kvc plan --list")


def test_a_missing_path_is_a_one_line_error(tmp_path):
    assert_one_line_error(invoke(str(tmp_path / "nope" / "config.json")), "does not exist")


@pytest.mark.parametrize("flag, value, fragment", [("--memory", "80XB", "80GiB"), ("--memory", "80", "80GiB"),
                                                   ("--bandwidth", "3.35TB", "3.35TB/s"),
                                                   ("--context", "0", "--context")])
def test_bad_values_are_one_line_errors(flag, value, fragment):
    assert_one_line_error(invoke("llama-2-7b", flag, value), fragment)


def test_fp8_scales_on_another_dtype_is_refused():
    assert_one_line_error(invoke("llama-2-7b", "--fp8-scales", "dynamic"), "--kv-dtype fp8")


def test_no_model_is_a_one_line_error():
    assert_one_line_error(invoke(), "kvc plan --list")
