"""Checkpoint loaders: round trips of own seeded models through HF-style safetensors and llama2.c files, and
every malformed input the loaders must refuse with a CheckpointError naming the problem."""
from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kvc.errors import CheckpointError
from kvc.models import empty_past, random_model
from kvc.models.config import Family
from kvc.models.loaders.hf import config_from_hf_dict, load_hf_checkpoint
from kvc.models.loaders.llama2c import interleaved_to_rotate_half, load_llama2c_checkpoint
from kvc.models.loaders.source import GenerationDefaults, SourceKind, load_source
from kvc.models.presets import RANDOM_PRESETS

TINY = RANDOM_PRESETS["tiny"]
TINY_HF_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 256,
                  "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "intermediate_size": 128, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5,
                  "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
GPT2 = RANDOM_PRESETS["tiny-gpt2"]
GPT2_HF_CONFIG = {"model_type": "gpt2", "vocab_size": 256, "n_embd": 64, "n_layer": 2, "n_head": 4,
                  "n_positions": 1024, "bos_token_id": 0, "eos_token_id": 0}


def hf_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under HF names (own names are HF names), a tied lm_head stored once."""
    tensors = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight")
    return tensors


def write_checkpoint(directory: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


@pytest.fixture
def tiny_dir(tmp_path):
    model = random_model(TINY, seed=3)
    return write_checkpoint(tmp_path / "ckpt", TINY_HF_CONFIG, hf_tensors(model)), model


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def logits(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out, _ = model(ids, torch.ones_like(ids), torch.arange(6)[None], empty_past(model.config, 1))
    return out


# --------------------------------------------------------------------------- Hugging Face: good checkpoints
def test_hf_round_trip_loads_every_weight(tiny_dir):
    directory, model = tiny_dir
    loaded = load_hf_checkpoint(directory)
    assert loaded.config == TINY.replace(name="ckpt")
    assert same_weights(loaded.model, model) and not loaded.model.training


def test_bf16_weights_load_as_fp32(tmp_path):
    model = random_model(TINY, seed=3)
    tensors = {k: v.to(torch.bfloat16) for k, v in hf_tensors(model).items()}
    loaded = load_hf_checkpoint(write_checkpoint(tmp_path, TINY_HF_CONFIG, tensors)).model
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert torch.equal(loaded.model.norm.weight, model.model.norm.weight.to(torch.bfloat16).float())


def test_sharded_checkpoint_loads_like_a_single_file(tiny_dir, tmp_path):
    directory, model = tiny_dir
    tensors = hf_tensors(model)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text(json.dumps(TINY_HF_CONFIG))
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(sharded / file))
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert same_weights(load_hf_checkpoint(sharded).model, model)


def test_tied_checkpoint_with_buffers_and_a_stored_lm_head_copy(tmp_path):
    """Rotary inv_freq buffers are dropped, and a tied head stored anyway is the embedding."""
    config = TINY.replace(tie_word_embeddings=True)
    model = random_model(config, seed=4)
    tensors = hf_tensors(model)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    directory = write_checkpoint(tmp_path, {**TINY_HF_CONFIG, "tie_word_embeddings": True}, tensors)
    loaded = load_hf_checkpoint(directory).model
    assert same_weights(loaded, model)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_llama_names_without_the_model_prefix(tmp_path):
    model = random_model(TINY, seed=5)
    tensors = {k.removeprefix("model."): v for k, v in hf_tensors(model).items()}
    assert same_weights(load_hf_checkpoint(write_checkpoint(tmp_path, TINY_HF_CONFIG, tensors)).model, model)


@pytest.mark.parametrize("prefix", ["transformer.", ""])
def test_gpt2_conv1d_weights_are_transposed(tmp_path, prefix):
    """HF GPT-2 stores c_attn/c_proj/c_fc as Conv1D [in, out]; the original checkpoints have no prefix."""
    model = random_model(GPT2, seed=6)
    tensors = {}
    for name, tensor in hf_tensors(model).items():
        if name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            tensor = tensor.t().contiguous()
        tensors[prefix + name.removeprefix("transformer.")] = tensor
    tensors[f"{prefix}h.0.attn.bias"] = torch.ones(1, 1, 8, 8)  # old GPT-2 mask buffer, dropped
    loaded = load_hf_checkpoint(write_checkpoint(tmp_path, GPT2_HF_CONFIG, tensors))
    assert loaded.config == GPT2.replace(name=tmp_path.name, attention_bias=True, mlp_bias=True)
    assert same_weights(loaded.model, model)
    assert torch.equal(logits(loaded.model), logits(model))


# --------------------------------------------------------------------------- Hugging Face: refused
def test_missing_config_json(tmp_path):
    save_file(hf_tensors(random_model(TINY)), str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_hf_checkpoint(tmp_path)


def test_unreadable_config_json(tiny_dir):
    directory, _ = tiny_dir
    (directory / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="cannot read .*config.json as JSON"):
        load_hf_checkpoint(directory)


def test_missing_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_HF_CONFIG))
    with pytest.raises(CheckpointError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_hf_checkpoint(tmp_path)


def test_pickle_weights_are_refused_without_unpickling(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_HF_CONFIG))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle that must never be loaded")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*never unpickles.*model.safetensors"):
        load_hf_checkpoint(tmp_path)


def test_garbage_safetensors(tiny_dir):
    directory, _ = tiny_dir
    (directory / "model.safetensors").write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file"):
        load_hf_checkpoint(directory)


def test_truncated_safetensors(tiny_dir):
    directory, _ = tiny_dir
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file.*truncated"):
        load_hf_checkpoint(directory)


def test_missing_tensor(tmp_path):
    tensors = hf_tensors(random_model(TINY))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match="no tensor for model.layers.1.mlp.up_proj.weight"):
        load_hf_checkpoint(write_checkpoint(tmp_path, TINY_HF_CONFIG, tensors))


def test_untied_config_without_lm_head(tmp_path):
    tensors = hf_tensors(random_model(TINY))
    del tensors["lm_head.weight"]
    with pytest.raises(CheckpointError, match="no tensor for lm_head.weight"):
        load_hf_checkpoint(write_checkpoint(tmp_path, TINY_HF_CONFIG, tensors))


def test_wrong_shape(tmp_path):
    tensors = hf_tensors(random_model(TINY))
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64)  # MHA-sized k for a GQA config
    with pytest.raises(CheckpointError, match=r"k_proj.weight has shape \[64, 64\] but the config needs \[32, 64\]"):
        load_hf_checkpoint(write_checkpoint(tmp_path, TINY_HF_CONFIG, tensors))


def test_tensor_the_model_has_no_place_for(tmp_path):
    """A tensor the config has no parameter for (o_proj.bias without attention_bias): refused, not dropped."""
    tensors = hf_tensors(random_model(TINY))
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    with pytest.raises(CheckpointError, match="no place for .*o_proj.bias"):
        load_hf_checkpoint(write_checkpoint(tmp_path, TINY_HF_CONFIG, tensors))


def test_index_naming_a_shard_outside_the_directory(tiny_dir):
    directory, _ = tiny_dir
    (directory / "model.safetensors").rename(directory.parent / "elsewhere.safetensors")
    index = {"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        load_hf_checkpoint(directory)


def test_index_naming_a_missing_shard(tiny_dir):
    directory, _ = tiny_dir
    (directory / "model.safetensors").unlink()
    index = {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors .*missing"):
        load_hf_checkpoint(directory)


# --------------------------------------------------------------------------- config.json mapping
def test_auto_map_is_refused(tiny_dir):
    directory, _ = tiny_dir
    (directory / "config.json").write_text(json.dumps({**TINY_HF_CONFIG, "auto_map": {"AutoModel": "x.Model"}}))
    with pytest.raises(CheckpointError, match="remote code"):
        load_hf_checkpoint(directory)


def test_unknown_model_type_names_the_supported_ones():
    with pytest.raises(CheckpointError, match="'falcon' is not supported; supported: llama, mistral, qwen2, gpt2, "
                                              "qwen3, phi3, gemma, gemma2, smollm3, olmo2, granite, stablelm"):
        config_from_hf_dict({**TINY_HF_CONFIG, "model_type": "falcon"})


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": None}, "lacks an integer 'hidden_size'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling 'yarn' is not supported"),
    ({"num_key_value_heads": 3}, "not divisible by num_kv_heads"),
    ({"eos_token_id": "two"}, "malformed value"),
    ({"rope_scaling": {"type": "linear"}}, "no numeric 'factor'"),
])
def test_unsupported_llama_configs(change, message):
    with pytest.raises(CheckpointError, match=message):
        config_from_hf_dict({**TINY_HF_CONFIG, **change})


def test_llama_config_variants():
    base = config_from_hf_dict(TINY_HF_CONFIG)
    assert base == TINY.replace(name="")
    # transformers 5 writes rope_parameters (theta inside) and the default head_dim out.
    v5 = {k: v for k, v in TINY_HF_CONFIG.items() if k != "rope_theta"}
    v5 |= {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}, "head_dim": 16}
    assert config_from_hf_dict(v5) == base.replace(rope_theta=5e5)
    assert config_from_hf_dict({**TINY_HF_CONFIG, "head_dim": 32}).resolved_head_dim == 32
    assert config_from_hf_dict({**TINY_HF_CONFIG, "eos_token_id": [2, 7]}).eos_token_ids == (2, 7)
    assert config_from_hf_dict({**TINY_HF_CONFIG, "num_key_value_heads": None}).num_kv_heads == 4
    llama3 = config_from_hf_dict({**TINY_HF_CONFIG, "rope_scaling": {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}})
    assert llama3.rope_scaling.kind.value == "llama3" and llama3.rope_scaling.factor == 32.0


def test_qwen2_sliding_window_only_when_used_by_every_layer():
    qwen = {**TINY_HF_CONFIG, "model_type": "qwen2", "sliding_window": 16, "max_window_layers": 28}
    assert config_from_hf_dict(qwen).sliding_window is None  # use_sliding_window absent: full attention
    assert config_from_hf_dict(qwen).attention_bias  # Qwen2 always has q/k/v biases
    assert config_from_hf_dict({**qwen, "use_sliding_window": True, "max_window_layers": 0}).sliding_window == 16
    assert config_from_hf_dict({**qwen, "use_sliding_window": True}).sliding_window is None  # 28 >= 2 layers
    with pytest.raises(CheckpointError, match="some layers only"):
        config_from_hf_dict({**qwen, "use_sliding_window": True, "max_window_layers": 1})


def test_gpt2_config_defaults_and_refusals():
    config = config_from_hf_dict({**GPT2_HF_CONFIG, "n_inner": None})
    assert config.intermediate_size == 4 * 64 and config.tie_word_embeddings and config.family is Family.GPT2
    assert config_from_hf_dict({**GPT2_HF_CONFIG, "n_inner": 100}).intermediate_size == 100
    with pytest.raises(CheckpointError, match="activation_function 'relu'"):
        config_from_hf_dict({**GPT2_HF_CONFIG, "activation_function": "relu"})
    with pytest.raises(CheckpointError, match="untied"):
        config_from_hf_dict({**GPT2_HF_CONFIG, "tie_word_embeddings": False})


# --------------------------------------------------------------------------- llama2.c
def llama2c_bytes(header: tuple[int, ...], gen: torch.Generator) -> tuple[bytes, dict[str, np.ndarray]]:
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = header
    kv_dim = kv_heads * dim // heads
    shapes = [("token_embedding", (abs(vocab), dim)), ("rms_att", (layers, dim)), ("wq", (layers, dim, dim)),
              ("wk", (layers, kv_dim, dim)), ("wv", (layers, kv_dim, dim)), ("wo", (layers, dim, dim)),
              ("rms_ffn", (layers, dim)), ("w1", (layers, hidden, dim)), ("w2", (layers, dim, hidden)),
              ("w3", (layers, hidden, dim)), ("rms_final", (dim,)), ("freq_real", (seq_len, dim // heads // 2)),
              ("freq_imag", (seq_len, dim // heads // 2))]
    if vocab < 0:
        shapes.append(("wcls", (-vocab, dim)))
    arrays = {name: torch.randn(shape, generator=gen).numpy() for name, shape in shapes}
    return struct.pack("<7i", *header) + b"".join(a.astype("<f4").tobytes() for a in arrays.values()), arrays


def test_llama2c_untied_classifier_and_layout(tmp_path):
    data, arrays = llama2c_bytes((16, 24, 2, 4, 2, -32, 8), torch.Generator().manual_seed(0))
    path = tmp_path / "model.bin"
    path.write_bytes(data)
    loaded = load_llama2c_checkpoint(path)
    model, config = loaded.model, loaded.config
    assert not config.tie_word_embeddings and (config.vocab_size, config.num_kv_heads) == (32, 2)
    assert np.array_equal(model.lm_head.weight.detach().numpy(), arrays["wcls"])
    assert np.array_equal(model.model.embed_tokens.weight.detach().numpy(), arrays["token_embedding"])
    assert np.array_equal(model.model.layers[1].mlp.down_proj.weight.detach().numpy(), arrays["w2"][1])
    assert np.array_equal(model.model.layers[1].self_attn.v_proj.weight.detach().numpy(), arrays["wv"][1])


def interleaved_rope(x: torch.Tensor, pos: int, head_dim: int) -> torch.Tensor:
    """llama2.c's RoPE on one head vector: rotate (x[i], x[i+1]) by pos * 10000^(-i/head_dim), i even."""
    out = x.clone()
    for i in range(0, head_dim, 2):
        angle = pos * 10000.0 ** (-i / head_dim)
        c, s = math.cos(angle), math.sin(angle)
        out[i], out[i + 1] = x[i] * c - x[i + 1] * s, x[i] * s + x[i + 1] * c
    return out


def rotate_half_rope(x: torch.Tensor, pos: int, head_dim: int) -> torch.Tensor:
    half = head_dim // 2
    angles = pos * 10000.0 ** (-torch.arange(half, dtype=torch.float64) * 2 / head_dim)
    c, s = torch.cat((angles.cos(), angles.cos())), torch.cat((angles.sin(), angles.sin()))
    return x * c + torch.cat((-x[half:], x[:half])) * s


def test_permuted_rows_give_rotate_half_rope_the_same_attention_scores():
    """q.k after llama2.c RoPE with the original rows == q.k after HF RoPE with the permuted rows."""
    gen = torch.Generator().manual_seed(1)
    heads, head_dim, dim = 2, 8, 12
    wq, wk = (torch.randn(heads * head_dim, dim, generator=gen, dtype=torch.float64) for _ in range(2))
    x_q, x_k = (torch.randn(dim, generator=gen, dtype=torch.float64) for _ in range(2))
    pq, pk = interleaved_to_rotate_half(wq, heads, head_dim), interleaved_to_rotate_half(wk, heads, head_dim)
    for h in range(heads):
        rows = slice(h * head_dim, (h + 1) * head_dim)
        want = interleaved_rope(wq[rows] @ x_q, 7, head_dim) @ interleaved_rope(wk[rows] @ x_k, 3, head_dim)
        got = rotate_half_rope(pq[rows] @ x_q, 7, head_dim) @ rotate_half_rope(pk[rows] @ x_k, 3, head_dim)
        assert abs(float(want - got)) < 1e-12


def test_truncated_llama2c_checkpoint(tmp_path):
    data, _ = llama2c_bytes((16, 24, 2, 4, 2, 32, 8), torch.Generator().manual_seed(0))
    path = tmp_path / "model.bin"
    path.write_bytes(data[:-4])
    with pytest.raises(CheckpointError, match=f"{len(data) - 4} bytes but its header .* needs {len(data)}.*truncated"):
        load_llama2c_checkpoint(path)
    path.write_bytes(data[:10])
    with pytest.raises(CheckpointError, match="shorter than a llama2.c header"):
        load_llama2c_checkpoint(path)


def test_not_a_llama2c_checkpoint(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(struct.pack("<7i", 0x616B3432, 1, 2, 3, 4, 5, 6))
    with pytest.raises(CheckpointError, match="version-1/2 export.*--version 0"):
        load_llama2c_checkpoint(path)
    path.write_bytes(struct.pack("<7i", 64, 0, 2, 5, 1, 32, 8) + b"\0" * 100)
    with pytest.raises(CheckpointError, match="impossible llama2.c header"):
        load_llama2c_checkpoint(path)


# --------------------------------------------------------------------------- load_source
def test_preset_source_is_the_seeded_random_model():
    loaded = load_source("tiny", seed=11)
    assert loaded.source_kind is SourceKind.PRESET and loaded.tokenizer is None
    assert same_weights(loaded.model, random_model(TINY, seed=11))
    assert loaded.generation == GenerationDefaults(eos_token_ids=(2,), bos_token_id=1, add_bos=True, max_length=1024)


def test_hf_source_reads_generation_and_tokenizer_files(tiny_dir):
    from tokenizers import Tokenizer, models, processors

    directory, model = tiny_dir
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "hi": 3}, unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": [2, 9], "do_sample": True, "temperature": 0.7, "top_p": 0.9}))
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}"}))
    loaded = load_source(str(directory))
    assert loaded.source_kind is SourceKind.HF and same_weights(loaded.model, model)
    assert loaded.tokenizer.encode("hi").ids == [1, 3]
    assert loaded.generation == GenerationDefaults(eos_token_ids=(2, 9), bos_token_id=1, add_bos=True,
                                                   max_length=1024, temperature=0.7, top_p=0.9)
    assert loaded.chat_template == "{{ messages[0]['content'] }}"
    # Greedy by default: temperature is a default only when the checkpoint samples.
    (directory / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.7}))
    (directory / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    again = load_source(str(directory / "config.json"))
    assert again.generation.temperature is None and not again.generation.add_bos
    assert again.generation.eos_token_ids == (2,)


def write_llama2c_vocab(path: Path, size: int) -> None:
    """<unk>, BOS, EOS, the 256 byte pieces, then single letters: a valid llama2.c tokenizer file."""
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n", *(f"<0x{b:02X}>".encode() for b in range(256))]
    pieces += [chr(ord("a") + i).encode() for i in range(size - len(pieces))]
    path.write_bytes(struct.pack("<i", 8) + b"".join(struct.pack("<fi", 0.0, len(p)) + p for p in pieces))


def test_llama2c_source_uses_the_tokenizer_argument(tmp_path):
    data, _ = llama2c_bytes((16, 24, 2, 4, 2, 265, 8), torch.Generator().manual_seed(0))
    (tmp_path / "model.bin").write_bytes(data)
    loaded = load_source(str(tmp_path / "model.bin"))
    assert loaded.source_kind is SourceKind.LLAMA2C and loaded.tokenizer is None  # none beside it
    write_llama2c_vocab(tmp_path / "tokA.bin", 265)
    write_llama2c_vocab(tmp_path / "tokB.bin", 265)
    with pytest.raises(CheckpointError, match="several tokenizers .*--tokenizer"):
        load_source(str(tmp_path / "model.bin"))
    loaded = load_source(str(tmp_path / "model.bin"), tokenizer_path=str(tmp_path / "tokB.bin"))
    assert loaded.tokenizer.get_vocab_size() == 265
    write_llama2c_vocab(tmp_path / "tok265.bin", 265)  # tok{vocab_size}.bin wins over other candidates
    assert load_source(str(tmp_path / "model.bin")).tokenizer is not None


def test_unknown_source_lists_what_is_accepted():
    with pytest.raises(CheckpointError, match="preset id \\(tiny, .*checkpoint directory.*llama2.c .bin.*Hub id"):
        load_source("no-such-thing")
    with pytest.raises(CheckpointError, match="neither a llama2.c .bin checkpoint nor a Hugging Face config.json"):
        load_source(__file__)


def test_hub_id_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import now raises ImportError
    with pytest.raises(CheckpointError, match="needs huggingface_hub: pip install 'kvc\\[hub\\]'"):
        load_source("HuggingFaceTB/SmolLM-135M")


def test_hub_id_that_cannot_be_fetched():
    """Offline (this machine) or online (a repository that does not exist): a CheckpointError either way."""
    pytest.importorskip("huggingface_hub")
    with pytest.raises(CheckpointError, match="could not be fetched from the Hugging Face Hub"):
        load_source("kvc-tests-no-such-org/no-such-model-3f9a1c")
