"""Tokenizers: Hugging Face tokenizer.json files, llama2.c tokenizer .bin files, and saving beside an export.

A llama2.c tokenizer is a SentencePiece BPE vocabulary (pieces + scores). It becomes a ``tokenizers`` BPE
whose merges are every (left, right) pair of pieces that concatenates to a piece, ranked by the merged
piece's score: llama2.c's encoder merges the highest-scoring pair first, the BPE model the lowest rank.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

from kvc.errors import CheckpointError

if TYPE_CHECKING:
    from kvc.models.loaders.source import GenerationDefaults

__all__ = ["Llama2cVocab", "load_tokenizer", "read_llama2c_vocab", "llama2c_tokenizer", "save_tokenizer",
           "TOKENIZER_FILE", "TOKENIZER_CONFIG_FILE"]

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPACE = "\u2581"  # SentencePiece's visible space; llama2.c's .bin stores it as " "
# llama2.c's ids 0..2; its .bin spells BOS/EOS "\n<s>\n" / "\n</s>\n", SentencePiece "<s>" / "</s>".
SPECIAL_PIECES = ("<unk>", "<s>", "</s>")
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A Hugging Face tokenizer.json (or a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for both missing and malformed files
        raise CheckpointError(f"cannot load tokenizer {path} ({exc}); pass a valid Hugging Face tokenizer.json") \
            from None


def post_processor_adds_bos(tokenizer: Tokenizer, bos: int) -> bool:
    """Whether the tokenizer's post-processor prepends ``bos`` to plain text (it is not part of the text)."""
    with_special = tokenizer.encode("a", add_special_tokens=True).ids
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    return with_special[:1] == [bos] and plain[:1] != [bos]


# --------------------------------------------------------------------------- llama2.c tokenizer .bin
@dataclass(frozen=True)
class Llama2cVocab:
    pieces: tuple[str, ...]  # as in the file: spaces, not "▁"; BOS/EOS as "\n<s>\n" / "\n</s>\n"
    scores: tuple[float, ...]
    max_token_length: int


def read_llama2c_vocab(path: str | os.PathLike) -> Llama2cVocab:
    """int32 max_token_length, then per token: float32 score, int32 byte length, the UTF-8 bytes."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read tokenizer {path} ({exc}); pass an existing llama2.c tok*.bin") from None
    if len(data) < 4:
        raise CheckpointError(f"{path} is too short to be a llama2.c tokenizer; the file is truncated")
    (max_len,), offset = struct.unpack_from("<i", data), 4
    pieces, scores = [], []
    while offset < len(data):
        if offset + 8 > len(data):
            raise CheckpointError(f"{path} ends inside token {len(pieces)}'s header; the file is truncated")
        score, length = struct.unpack_from("<fi", data, offset)
        offset += 8
        if length <= 0 or length > max_len or offset + length > len(data):
            raise CheckpointError(f"{path}: token {len(pieces)} claims {length} bytes (max {max_len}, "
                                  f"{len(data) - offset} left); the file is truncated or not a llama2.c tokenizer")
        try:
            pieces.append(data[offset:offset + length].decode("utf-8"))
        except UnicodeDecodeError:
            raise CheckpointError(f"{path}: token {len(pieces)} is not UTF-8; not a llama2.c tokenizer") from None
        scores.append(score)
        offset += length
    return Llama2cVocab(tuple(pieces), tuple(scores), max_len)


def llama2c_tokenizer(path: str | os.PathLike, vocab_size: Optional[int] = None) -> Tokenizer:
    """Convert a llama2.c tokenizer .bin into a ``tokenizers.Tokenizer`` that encodes and decodes like run.c.

    run.c's encode: prepend a dummy-prefix space, look up each UTF-8 character (bytes as <0xXX> pieces when
    absent), then repeatedly merge the adjacent pair whose concatenation is the highest-scoring piece.
    Its decode: raw bytes for <0xXX> pieces, and no leading space on the first piece after BOS.
    """
    vocab = read_llama2c_vocab(path)
    if vocab_size is not None and len(vocab.pieces) != vocab_size:
        raise CheckpointError(f"tokenizer {path} has {len(vocab.pieces)} tokens but the model has {vocab_size}; "
                              "pass the tokenizer the checkpoint was trained with")
    pieces = _hf_pieces(vocab.pieces, path)
    ids = {piece: i for i, piece in enumerate(pieces)}
    bpe = models.BPE(vocab=ids, merges=_merges_by_score(pieces, vocab.scores), unk_token=SPECIAL_PIECES[UNK_ID],
                     byte_fallback=True, fuse_unk=True)
    tok = Tokenizer(bpe)
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in SPECIAL_PIECES])
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1, right=0)])
    bos = SPECIAL_PIECES[BOS_ID]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                       special_tokens=[(bos, BOS_ID)])
    return tok


def _hf_pieces(pieces: tuple[str, ...], path: Path) -> list[str]:
    if len(pieces) <= EOS_ID:
        raise CheckpointError(f"{path} has {len(pieces)} tokens; a llama2.c tokenizer starts with <unk>, BOS, EOS")
    converted = [*SPECIAL_PIECES, *(p.replace(" ", SPACE) for p in pieces[len(SPECIAL_PIECES):])]
    if len(set(converted)) != len(converted):
        raise CheckpointError(f"{path} holds the same piece twice; not a SentencePiece vocabulary")
    return converted


def _is_byte_piece(piece: str) -> bool:
    return len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")


def _merges_by_score(pieces: list[str], scores: tuple[float, ...]) -> list[tuple[str, str]]:
    """Every split of a piece into two pieces, best merged-piece score first (ties: lower id, left split)."""
    mergeable = {p: i for i, p in enumerate(pieces) if i >= len(SPECIAL_PIECES) and not _is_byte_piece(p)}
    ranked = []
    for piece, i in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-scores[i], i, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


# --------------------------------------------------------------------------- saving beside an export
def save_tokenizer(tokenizer: Tokenizer, directory: str | os.PathLike,
                   generation: Optional["GenerationDefaults"] = None,
                   chat_template: str | list | None = None) -> list[Path]:
    """Write tokenizer.json and a tokenizer_config.json (BOS/EOS text, add_bos, chat template when known)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / TOKENIZER_FILE))
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if generation is not None:
        config.update(_special_token_texts(tokenizer, generation))
        config["add_bos_token"] = generation.add_bos
    if chat_template:
        config["chat_template"] = chat_template
    (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    return [directory / TOKENIZER_FILE, directory / TOKENIZER_CONFIG_FILE]


def _special_token_texts(tokenizer: Tokenizer, generation: "GenerationDefaults") -> dict[str, str]:
    texts = {}
    if generation.bos_token_id is not None and tokenizer.id_to_token(generation.bos_token_id) is not None:
        texts["bos_token"] = tokenizer.id_to_token(generation.bos_token_id)
    if generation.eos_token_ids and tokenizer.id_to_token(generation.eos_token_ids[0]) is not None:
        texts["eos_token"] = tokenizer.id_to_token(generation.eos_token_ids[0])
    return texts
