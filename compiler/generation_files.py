"""Generation defaults (EOS, BOS, whether text gets BOS, sampling) from the files beside a model.

Reads generation_config.json (kvc export's form or Hugging Face's), tokenizer_config.json (eos_token /
bos_token as text, add_bos_token) and tokenizer.json (to turn that text into ids), each bounded
(kvc.userfiles). The order in which these and the model config are consulted is documented in
kvc.compiler.model_description, which is the only caller. The chat template needs nothing here: its files
(tokenizer_config.json, chat_template.jinja) are copied into the artifact, where the runtime reads them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from kvc.errors import CheckpointError
from kvc.userfiles import parse_json, read_user_bytes, read_user_json

GENERATION_FILE = "generation_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_JSON_FILE = "tokenizer.json"
MAX_TOKENIZER_BYTES = 256 << 20  # the largest Hugging Face tokenizer.json files are tens of MB

# The keys of the manifest's generation object (kvc export's generation_config.json uses the same).
EOS_IDS, BOS_ID, ADD_BOS, MAX_LENGTH, TEMPERATURE, TOP_P = (
    "eos_token_ids", "bos_token_id", "add_bos", "max_length", "temperature", "top_p")


def read_beside(model_dir: Path, name: str) -> Optional[dict[str, Any]]:
    """A JSON object file beside the model, or None when there is none."""
    path = model_dir / name
    if not path.exists():
        return None
    return read_user_json(path, name, error=CheckpointError)


def from_generation_config(raw: dict[str, Any]) -> dict[str, Any]:
    """kvc's generation keys from a generation_config.json in kvc export's form (eos_token_ids, add_bos)
    or Hugging Face's (eos_token_id: int or list, do_sample + temperature / top_p)."""
    found: dict[str, Any] = {}
    if raw.get(EOS_IDS) is not None:
        found[EOS_IDS] = _ids(raw[EOS_IDS], EOS_IDS)
    elif raw.get("eos_token_id") is not None:
        found[EOS_IDS] = _ids(raw["eos_token_id"], "eos_token_id")
    if raw.get(BOS_ID) is not None:
        found[BOS_ID] = _ids(raw[BOS_ID], BOS_ID)[0]
    if isinstance(raw.get(ADD_BOS), bool):
        found[ADD_BOS] = raw[ADD_BOS]
    if isinstance(raw.get(MAX_LENGTH), int) and not isinstance(raw[MAX_LENGTH], bool):
        found[MAX_LENGTH] = raw[MAX_LENGTH]
    sampling = raw.get("do_sample", EOS_IDS in raw)  # kvc's form writes sampling values only when they apply
    for key in (TEMPERATURE, TOP_P):
        if sampling and isinstance(raw.get(key), (int, float)) and not isinstance(raw[key], bool):
            found[key] = float(raw[key])
    return found


def from_tokenizer_files(model_dir: Path, tok_config: dict[str, Any]) -> dict[str, Any]:
    """eos/bos ids named as text in tokenizer_config.json (looked up in its added_tokens_decoder or
    tokenizer.json's vocabulary) and its add_bos_token."""
    found: dict[str, Any] = {}
    texts = {key: _token_text(tok_config.get(field)) for key, field in ((EOS_IDS, "eos_token"), (BOS_ID, "bos_token"))}
    if any(texts.values()):
        vocab = _token_ids(model_dir, tok_config)
        if texts[EOS_IDS] in vocab:
            found[EOS_IDS] = [vocab[texts[EOS_IDS]]]
        if texts[BOS_ID] in vocab:
            found[BOS_ID] = vocab[texts[BOS_ID]]
    if isinstance(tok_config.get("add_bos_token"), bool):
        found[ADD_BOS] = tok_config["add_bos_token"]
    return found


def tokenizer_adds_bos(model_dir: Path, bos: int) -> Optional[bool]:
    """Whether tokenizer.json's post-processor prepends ``bos`` (None: no tokenizer.json beside)."""
    path = model_dir / TOKENIZER_JSON_FILE
    if not path.exists():
        return None
    from tokenizers import Tokenizer

    data = read_user_bytes(path, "tokenizer", MAX_TOKENIZER_BYTES, error=CheckpointError)
    try:
        tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception for malformed files
        raise CheckpointError(f"cannot load tokenizer {path} ({str(exc)[:120]}); pass a valid Hugging Face "
                              "tokenizer.json") from None
    from kvc.models.tokenizer import post_processor_adds_bos

    return post_processor_adds_bos(tokenizer, bos)


def check_ids_in_vocab(generation: dict[str, Any], vocab_size: int, where: str) -> None:
    ids = list(generation.get(EOS_IDS, [])) + ([generation[BOS_ID]] if generation.get(BOS_ID) is not None else [])
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise CheckpointError(f"token id {bad[0]} from {where} is outside the model's vocabulary of {vocab_size}; "
                              "the files beside the model belong to another model: remove or fix them")


def _ids(value: Any, key: str) -> list[int]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise CheckpointError(f"{GENERATION_FILE} beside the model has {key} {value!r}; expected a token id or a "
                              "list of them")
    return list(values)


def _token_text(value: Any) -> Optional[str]:
    """tokenizer_config writes special tokens as text or as {"content": text, ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _token_ids(model_dir: Path, tok_config: dict[str, Any]) -> dict[str, int]:
    """Special-token text -> id: tokenizer_config's added_tokens_decoder, else tokenizer.json's added tokens
    and vocabulary."""
    ids: dict[str, int] = {}
    for key, entry in (tok_config.get("added_tokens_decoder") or {}).items():
        if isinstance(entry, dict) and isinstance(entry.get("content"), str) and str(key).isdigit():
            ids[entry["content"]] = int(key)
    path = model_dir / TOKENIZER_JSON_FILE
    if path.exists():
        raw = parse_json(read_user_bytes(path, "tokenizer", MAX_TOKENIZER_BYTES, error=CheckpointError),
                         str(path), "tokenizer", CheckpointError)
        raw = raw if isinstance(raw, dict) else {}
        for entry in raw.get("added_tokens") or []:
            if isinstance(entry, dict) and isinstance(entry.get("content"), str) and isinstance(entry.get("id"), int):
                ids.setdefault(entry["content"], entry["id"])
        model = raw.get("model")
        vocab = model.get("vocab") if isinstance(model, dict) else None
        if isinstance(vocab, dict):
            for text, i in vocab.items():
                if isinstance(i, int):
                    ids.setdefault(text, i)
    return ids

