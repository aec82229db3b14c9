"""The model description of a graph kvc did not export: generation defaults (EOS, BOS) from the files beside
it (generation_config.json, tokenizer_config.json, config.json) in the documented order, used by `kvc run`
to stop; and `--config` for any decoder's config.json."""
from __future__ import annotations

import json
from pathlib import Path

import onnx
import onnx_ir as ir
import pytest

from kvc.compiler.options import CompileOptions
from kvc.errors import CheckpointError, GraphError

# The "tiny" preset's geometry (vocab 256, hidden 64, 4 heads, 2 kv heads, 2 layers).
TINY = {"vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 1024}
PROMPT = [3, 17, 42, 99]


@pytest.fixture(scope="module")
def foreign_onnx(exported, tmp_path_factory) -> Path:
    """The tiny export without kvc's metadata: a graph as another exporter would hand it over."""
    _, _, onnx_path = exported("tiny")
    proto = onnx.load(onnx_path)
    del proto.metadata_props[:]
    path = tmp_path_factory.mktemp("foreign") / "model.onnx"
    onnx.save(proto, path)
    return path


def fresh_dir(foreign_onnx: Path, tmp_path: Path, files: dict[str, dict]) -> Path:
    """The foreign model.onnx in a directory of its own, with ``files`` (name -> JSON) beside it."""
    model_dir = tmp_path / "model"
    model_dir.mkdir(parents=True)
    (model_dir / "model.onnx").write_bytes(foreign_onnx.read_bytes())
    for name, content in files.items():
        (model_dir / name).write_text(json.dumps(content))
    return model_dir / "model.onnx"


def describe(onnx_path: Path, **options):
    from kvc.compiler.model_description import describe_model

    return describe_model(ir.load(onnx_path), onnx_path.parent, CompileOptions(max_seq_len=32, **options))


# --------------------------------------------------------------------------- generation defaults
def test_files_beside_are_read_in_the_documented_order(foreign_onnx, tmp_path):
    path = fresh_dir(foreign_onnx, tmp_path, {
        "generation_config.json": {"eos_token_id": [5, 6], "do_sample": False, "temperature": 0.7},
        "tokenizer_config.json": {"eos_token": "<e>", "bos_token": {"content": "<b>"}, "add_bos_token": False,
                                  "added_tokens_decoder": {"4": {"content": "<b>"}, "9": {"content": "<e>"}}},
        "config.json": {**TINY, "model_type": "llama", "bos_token_id": 1, "eos_token_id": 7}})
    generation = describe(path).generation
    assert generation["eos_token_ids"] == [5, 6]  # generation_config.json wins over the others
    assert generation["bos_token_id"] == 4  # it has no BOS: tokenizer_config.json's, not config.json's 1
    assert generation["add_bos"] is False
    assert "temperature" not in generation  # do_sample false: the checkpoint does not ask for sampling


def word_tokenizer_json() -> dict:
    """A real tokenizer.json: words a / b, special </s> = 11, and a post-processor that prepends <s> = 1."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "a": 12, "b": 13, "</s>": 11}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["</s>", "<s>"])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return json.loads(tokenizer.to_str())


def test_tokenizer_config_then_model_config(foreign_onnx, tmp_path):
    path = fresh_dir(foreign_onnx, tmp_path, {
        "tokenizer_config.json": {"eos_token": "</s>"},
        "tokenizer.json": word_tokenizer_json(),
        "config.json": {**TINY, "model_type": "llama", "bos_token_id": 1, "eos_token_id": 7}})
    generation = describe(path).generation
    assert generation["eos_token_ids"] == [11]  # "</s>" looked up in tokenizer.json
    assert generation["bos_token_id"] == 1  # from config.json
    assert generation["add_bos"] is True  # nobody says: tokenizer.json's post-processor prepends it


def test_an_id_outside_the_vocabulary_is_refused_naming_the_file(foreign_onnx, tmp_path):
    path = fresh_dir(foreign_onnx, tmp_path, {"generation_config.json": {"eos_token_id": 50256}})
    with pytest.raises(CheckpointError, match=r"token id 50256 from .*generation_config.json is outside the "
                                              r"model's vocabulary of 256"):
        describe(path)


def test_kvc_run_stops_at_the_eos_from_generation_config_beside(foreign_onnx, tmp_path):
    """Without files beside, greedy decoding runs the full budget; with the HF generation_config.json naming
    the 3rd generated token as EOS, `kvc run` stops right there."""
    from click.testing import CliRunner

    from kvc.cli.main import cli

    def run(onnx_path: Path, out: Path) -> dict:
        assert CliRunner().invoke(cli, ["compile", str(onnx_path), "-o", str(out), "--max-seq-len", "32"],
                                  catch_exceptions=False).exit_code == 0
        result = CliRunner().invoke(cli, ["run", str(out), "--prompt-ids", ",".join(map(str, PROMPT)), "-n", "8",
                                          "--json"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return json.loads(result.output.strip().splitlines()[-1])

    free = run(fresh_dir(foreign_onnx, tmp_path / "a", {}), tmp_path / "free.kvc")
    tokens = free["token_ids"]
    assert len(tokens) == 8 and free["finish_reason"] == "length"
    stop_at = next(k for k in range(1, 8) if tokens[k] not in tokens[:k])
    beside = {"generation_config.json": {"eos_token_id": tokens[stop_at], "bos_token_id": 1}}
    stopped = run(fresh_dir(foreign_onnx, tmp_path / "b", beside), tmp_path / "stopped.kvc")
    assert stopped["finish_reason"] == "eos"
    assert stopped["token_ids"] == tokens[:stop_at]


# --------------------------------------------------------------------------- --config for any decoder
@pytest.mark.parametrize("model_type, extra", [
    ("qwen3", {"head_dim": 16}),
    ("phi3", {}),
    ("gemma", {"head_dim": 16}),
    ("mixtral", {"num_local_experts": 4}),  # not a family kvc export builds
    ("cohere", {}),
    ("falcon_h1", {"hidden_act": "gelu"}),
])
def test_config_of_any_decoder_is_accepted(foreign_onnx, tmp_path, model_type, extra):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**TINY, **extra, "model_type": model_type, "eos_token_id": 2}))
    described = describe(foreign_onnx, config_path=config)
    assert (described.config.num_layers, described.config.num_kv_heads, described.config.resolved_head_dim) \
        == (2, 2, 16)
    assert described.config.max_position_embeddings == 1024
    assert described.generation["eos_token_ids"] == [2]


def test_config_missing_a_needed_field_names_it(foreign_onnx, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**TINY, "model_type": "mixtral", "max_position_embeddings": None}))
    with pytest.raises(CheckpointError, match=r"config.json has no positive integer 'max_position_embeddings'"):
        describe(foreign_onnx, config_path=config)


def test_config_of_another_model_is_refused(foreign_onnx, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**TINY, "model_type": "mixtral", "num_key_value_heads": 4}))
    with pytest.raises(GraphError, match=r"says 4 kv heads but the graph's past key inputs have 2"):
        describe(foreign_onnx, config_path=config)


def test_config_with_an_unknown_type_compiles_and_passes_the_check(foreign_onnx, tmp_path):
    from kvc.compiler.pipeline import compile_model

    config = tmp_path / "config.json"
    config.write_text(json.dumps({**TINY, "model_type": "mixtral"}))
    lines: list[str] = []
    result = compile_model(foreign_onnx, tmp_path / "out.kvc", CompileOptions(max_seq_len=32, config_path=config),
                           progress=lines.append)
    assert "read generically" in result.config_source
    assert any(line.startswith("check vs the original graph") for line in lines)
