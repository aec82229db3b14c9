"""Streaming detokenization vs tokenizers' one-shot decode, on two tokenizers built here:
a byte-level BPE (GPT-2 style) and a SentencePiece-style BPE with byte fallback (Llama style)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from kvc.runtime.detokenize import IncrementalDetokenizer

TRAINING_TEXT = [
    "Once upon a time there was a little girl who liked to read.",
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, this is a small test of streaming text.",
]
TEXTS = [
    "Héllo wörld! 你好，世界。 Привет мир 🙂👍🏽 € naïve café 日本語 🇺🇳 the end.",
    "Once upon a time 🐉 there was a dragon who said «bonjour» and 😀😀 twice.",
    "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich. ∑ x² ≤ ∞",
]


def byte_level_bpe() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    tokenizer.train_from_iterator(TRAINING_TEXT + TEXTS[:1], trainer)
    return tokenizer


def sentencepiece_bpe_with_byte_fallback() -> Tokenizer:
    """Pieces trained on English only, so other characters fall back to <0xNN> byte tokens."""
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = metaspace
    plain.train_from_iterator(TRAINING_TEXT, trainers.BpeTrainer(vocab_size=200, limit_alphabet=40))
    trained = json.loads(plain.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{byte:02X}>": 3 + byte for byte in range(256)}
    for piece in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.pre_tokenizer = metaspace
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    return tokenizer


TOKENIZERS = {"byte-level": byte_level_bpe, "byte-fallback": sentencepiece_bpe_with_byte_fallback}


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def tokenizer(request) -> Tokenizer:
    return TOKENIZERS[request.param]()


def stream(tokenizer: Tokenizer, prompt_ids, generated_ids, **kwargs) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, **kwargs)
    return [detokenizer.push(token_id) for token_id in generated_ids] + [detokenizer.flush()]


def test_test_tokenizers_split_characters_into_bytes(tokenizer):
    """The cases below only mean something if single tokens decode to half characters."""
    ids = tokenizer.encode(TEXTS[0]).ids
    assert tokenizer.decode(ids) == TEXTS[0]
    assert any("\ufffd" in tokenizer.decode([token_id]) for token_id in ids)


def test_pushes_concatenate_to_full_decode_from_empty_prompt(tokenizer):
    for text in TEXTS:
        ids = tokenizer.encode(text).ids
        pieces = stream(tokenizer, [], ids)
        assert "".join(pieces) == tokenizer.decode(ids) == text
        assert not any("\ufffd" in piece for piece in pieces), "a partial UTF-8 character was emitted"


def test_pushes_concatenate_to_continuation_of_prompt_at_random_splits(tokenizer, rng):
    for text in TEXTS:
        ids = tokenizer.encode(text).ids
        # A prompt is text, so it ends on a whole character: split only where the prefix decodes cleanly.
        splits = [k for k in range(1, len(ids)) if not tokenizer.decode(ids[:k]).endswith("\ufffd")]
        for split in rng.choice(splits, size=8, replace=False):
            prompt_text = tokenizer.decode(ids[:split])
            assert text.startswith(prompt_text)
            pieces = stream(tokenizer, ids[:split], ids[split:])
            assert "".join(pieces) == text[len(prompt_text) :], f"split at token {split}"
            assert not any("\ufffd" in piece for piece in pieces)


def test_random_ids_stream_like_full_decode_on_byte_level():
    """Arbitrary model output, including invalid UTF-8 byte runs, still concatenates to decode()."""
    tokenizer = byte_level_bpe()
    rng = np.random.default_rng(5)
    for _ in range(20):
        ids = rng.integers(0, tokenizer.get_vocab_size(), size=40).tolist()
        assert "".join(stream(tokenizer, [], ids)) == tokenizer.decode(ids)


def test_byte_fallback_character_is_held_until_complete():
    tokenizer = sentencepiece_bpe_with_byte_fallback()
    euro = [tokenizer.token_to_id(f"<0x{byte:02X}>") for byte in "€".encode()]
    detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode("price").ids)
    assert [detokenizer.push(token_id) for token_id in euro] == ["", "", "€"]


def test_unfinished_character_is_flushed_as_replacement_like_decode():
    tokenizer = sentencepiece_bpe_with_byte_fallback()
    partial = [tokenizer.token_to_id(f"<0x{byte:02X}>") for byte in "€".encode()[:2]]
    pieces = stream(tokenizer, [], partial)
    assert pieces[:-1] == ["", ""]
    assert "".join(pieces) == tokenizer.decode(partial) == "\ufffd\ufffd"


def test_sentencepiece_leading_space_is_kept_after_a_prompt():
    tokenizer = sentencepiece_bpe_with_byte_fallback()
    prompt = tokenizer.encode("Once upon").ids
    generated = tokenizer.encode("Once upon a time").ids[len(prompt) :]
    assert tokenizer.decode(generated) == "a time"  # the decoder strips the first space of what it decodes
    assert "".join(stream(tokenizer, prompt, generated)) == " a time"


def test_special_tokens_are_skipped_unless_asked():
    tokenizer = sentencepiece_bpe_with_byte_fallback()
    ids = tokenizer.encode("the end").ids + [tokenizer.token_to_id("</s>")]
    assert "".join(stream(tokenizer, [], ids)) == "the end"
    assert "".join(stream(tokenizer, [], ids, skip_special_tokens=False)) == "the end</s>"
