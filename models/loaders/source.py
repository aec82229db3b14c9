"""SOURCE -> model: a random-init preset id, a Hugging Face checkpoint directory or hub id, a llama2.c .bin."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tokenizers import Tokenizer

from kvc.errors import CheckpointError
from kvc.models.config import ModelConfig
from kvc.models.loaders.source_kind import SourceKind, resolve_source
from kvc.userfiles import check_regular_file, read_user_text

MAX_TOKENIZER_BYTES = 256 << 20  # the largest Hugging Face tokenizer.json files are tens of MB

__all__ = ["SourceKind", "GenerationDefaults", "LoadedModel", "load_source"]

EXPORTABLE = frozenset({SourceKind.PRESET, SourceKind.HF, SourceKind.LLAMA2C})  # what `kvc export` reads

GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


@dataclass(frozen=True)
class GenerationDefaults:
    """What a checkpoint says about generating with it; written to generation_config.json by kvc export."""

    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: Optional[int] = None
    add_bos: bool = False  # prepend BOS to encoded text (the runtime encodes without special tokens)
    max_length: Optional[int] = None
    temperature: Optional[float] = None  # only when the checkpoint asks for sampling (do_sample)
    top_p: Optional[float] = None


@dataclass(frozen=True)
class LoadedModel:
    config: ModelConfig
    model: torch.nn.Module  # eval mode, float32
    tokenizer: Optional[Tokenizer]
    generation: GenerationDefaults
    source_kind: SourceKind
    chat_template: str | list | None = None  # HF tokenizer_config's template (a string or named templates)


def load_source(source: str, seed: int = 0, tokenizer_path: str | None = None) -> LoadedModel:
    """Load SOURCE: a preset id (seeded random init), a HF checkpoint directory, a llama2.c .bin (tokenizer
    from ``tokenizer_path`` or a tok*.bin beside it), or a Hugging Face Hub id."""
    from kvc.models.presets import RANDOM_PRESETS

    found = resolve_source(source, EXPORTABLE)
    if found is not None and found.kind is SourceKind.PRESET:
        return _preset(RANDOM_PRESETS[source], seed)
    if found is not None and found.kind is SourceKind.LLAMA2C:
        return _llama2c(found.path, tokenizer_path)
    if found is not None:
        return _hf(found.path if found.path is not None else source)  # a local checkpoint or a hub id
    if Path(source).is_file():
        raise CheckpointError(f"{source} is neither a llama2.c .bin checkpoint nor a Hugging Face config.json; pass "
                              "one of those, or the checkpoint directory")
    raise CheckpointError(
        f"unknown model source {source!r} (no such preset, file or directory): expected a preset id "
        f"({', '.join(RANDOM_PRESETS)}), a Hugging Face checkpoint directory (config.json + model.safetensors), "
        "a llama2.c .bin checkpoint, or a Hugging Face Hub id such as HuggingFaceTB/SmolLM-135M")


def _preset(config: ModelConfig, seed: int) -> LoadedModel:
    from kvc.models import random_model

    generation = GenerationDefaults(eos_token_ids=config.eos_token_ids, bos_token_id=config.bos_token_id,
                                    add_bos=config.bos_token_id is not None,
                                    max_length=config.max_position_embeddings)
    return LoadedModel(config, random_model(config, seed=seed), None, generation, SourceKind.PRESET)


# --------------------------------------------------------------------------- Hugging Face
def _hf(source: str | os.PathLike) -> LoadedModel:
    from kvc.models.loaders.hf import load_hf_checkpoint, read_json_file
    from kvc.models.tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, load_tokenizer

    checkpoint = load_hf_checkpoint(source)
    root = checkpoint.path
    if (root / TOKENIZER_FILE).exists():  # a FIFO or device there would hang or exhaust the tokenizer library
        check_regular_file(root / TOKENIZER_FILE, "tokenizer", limit=MAX_TOKENIZER_BYTES, error=CheckpointError)
    tokenizer = load_tokenizer(root / TOKENIZER_FILE) if (root / TOKENIZER_FILE).is_file() else None
    tok_config = read_json_file(root / TOKENIZER_CONFIG_FILE) if (root / TOKENIZER_CONFIG_FILE).is_file() else {}
    gen_config = read_json_file(root / GENERATION_CONFIG_FILE) if (root / GENERATION_CONFIG_FILE).is_file() else {}
    generation = _hf_generation(checkpoint.config, gen_config, tok_config, tokenizer)
    return LoadedModel(checkpoint.config, checkpoint.model, tokenizer, generation, SourceKind.HF,
                       _chat_template(root, tok_config))


def _hf_generation(config: ModelConfig, gen: dict, tok_config: dict,
                   tokenizer: Optional[Tokenizer]) -> GenerationDefaults:
    from kvc.models.loaders.hf import eos_token_ids

    eos = eos_token_ids(gen["eos_token_id"]) if "eos_token_id" in gen else config.eos_token_ids
    bos = gen.get("bos_token_id", config.bos_token_id)
    sampling = bool(gen.get("do_sample"))
    return GenerationDefaults(
        eos_token_ids=eos, bos_token_id=bos, add_bos=_adds_bos(bos, tok_config, tokenizer),
        max_length=gen.get("max_length", config.max_position_embeddings),
        temperature=float(gen["temperature"]) if sampling and gen.get("temperature") is not None else None,
        top_p=float(gen["top_p"]) if sampling and gen.get("top_p") is not None else None)


def _adds_bos(bos: Optional[int], tok_config: dict, tokenizer: Optional[Tokenizer]) -> bool:
    """tokenizer_config's add_bos_token when it says; otherwise whether tokenizer.json's post-processor adds it."""
    if bos is None or tokenizer is None:
        return False
    if isinstance(tok_config.get("add_bos_token"), bool):
        return tok_config["add_bos_token"]
    from kvc.models.tokenizer import post_processor_adds_bos

    return post_processor_adds_bos(tokenizer, bos)


def _chat_template(root: Path, tok_config: dict) -> str | list | None:
    """transformers >= 4.50 saves the template in chat_template.jinja, older ones in tokenizer_config.json."""
    if (root / CHAT_TEMPLATE_FILE).is_file():
        return read_user_text(root / CHAT_TEMPLATE_FILE, "chat template", error=CheckpointError)
    return tok_config.get("chat_template")


# --------------------------------------------------------------------------- llama2.c
def _llama2c(path: Path, tokenizer_path: str | None) -> LoadedModel:
    from kvc.models.loaders.llama2c import BOS_ID, EOS_ID, load_llama2c_checkpoint
    from kvc.models.tokenizer import llama2c_tokenizer

    checkpoint = load_llama2c_checkpoint(path)
    config = checkpoint.config
    tok_file = Path(tokenizer_path) if tokenizer_path else _tokenizer_beside(path, config.vocab_size)
    if tok_file is not None:
        check_regular_file(tok_file, "tokenizer", limit=MAX_TOKENIZER_BYTES, error=CheckpointError)
    tokenizer = llama2c_tokenizer(tok_file, config.vocab_size) if tok_file is not None else None
    # run.c stops when the model emits BOS (TinyStories separates stories with it), so BOS ends a sequence too.
    generation = GenerationDefaults(eos_token_ids=(EOS_ID, BOS_ID), bos_token_id=BOS_ID, add_bos=True,
                                    max_length=config.max_position_embeddings)
    return LoadedModel(config, checkpoint.model, tokenizer, generation, SourceKind.LLAMA2C)


def _tokenizer_beside(path: Path, vocab_size: int) -> Optional[Path]:
    """tok{vocab}.bin, else the only tok*.bin, else llama2.c's default tokenizer.bin; None when none is there."""
    preferred = path.parent / f"tok{vocab_size}.bin"
    if preferred.is_file():
        return preferred
    candidates = sorted(p for p in path.parent.glob("tok*.bin") if p.is_file() and p != path)
    if len(candidates) > 1:
        raise CheckpointError(f"several tokenizers beside {path} ({', '.join(p.name for p in candidates)}); "
                              "pass the right one with --tokenizer")
    return candidates[0] if candidates else None
