"""The llama2.c tokenizer converted to a ``tokenizers.Tokenizer`` vs two references: a line-by-line Python port
of llama2.c run.c's encode/decode (on seeded random text), and SentencePiece with the same vocabulary
(tok512.model) on ordinary text. Plus saving, loading and malformed files."""
from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest

from kvc.errors import CheckpointError
from kvc.models.tokenizer import load_tokenizer, llama2c_tokenizer, read_llama2c_vocab, save_tokenizer

STORIES = Path(__file__).resolve().parents[2].parent / "shared" / "models" / "stories260K"
TOK_BIN, TOK_MODEL = STORIES / "tok512.bin", STORIES / "tok512.model"
needs_stories = pytest.mark.skipif(not TOK_BIN.is_file(), reason=f"llama2.c tokenizer not found at {TOK_BIN}")
BOS = 1


# --------------------------------------------------------------------------- reference: run.c, ported
def run_c_encode(vocab, text: str) -> list[int]:
    """llama2.c run.c encode() without BOS/EOS: dummy-prefix space, per-character lookup with byte fallback
    (id = byte + 3), then repeatedly merge the leftmost adjacent pair whose concatenation scores highest."""
    lookup = {piece: i for i, piece in enumerate(vocab.pieces)}
    tokens = [lookup[" "]] if text else []
    for ch in text:
        tokens.extend([lookup[ch]] if ch in lookup else [b + 3 for b in ch.encode("utf-8")])
    while True:
        best_score, best_id, best_at = -1e10, -1, -1
        for i in range(len(tokens) - 1):
            merged = lookup.get(vocab.pieces[tokens[i]] + vocab.pieces[tokens[i + 1]])
            if merged is not None and vocab.scores[merged] > best_score:
                best_score, best_id, best_at = vocab.scores[merged], merged, i
        if best_at < 0:
            return tokens
        tokens[best_at:best_at + 2] = [best_id]


def run_c_decode(vocab, ids: list[int]) -> str:
    """run.c decode() over a sequence: the first piece after BOS loses its leading space; <0xXX> -> that byte."""
    out, prev = b"", BOS
    for token in ids:
        piece = vocab.pieces[token]
        if prev == BOS and piece.startswith(" "):
            piece = piece[1:]
        out += bytes([int(piece[3:5], 16)]) if piece.startswith("<0x") and len(piece) == 6 else piece.encode()
        prev = token
    return out.decode("utf-8", errors="replace")


def random_texts(vocab, count: int, seed: int) -> list[str]:
    """Seeded strings: runs of vocabulary pieces (deep merges), and random characters incl. repeated and
    leading spaces, newlines, digits, accents, CJK and emoji (byte fallback)."""
    rng = random.Random(seed)
    pieces = [p for p in vocab.pieces[259:] if p.strip()]
    chars = list("abcdefghijklmnopqrstuvwxyz      ,.!?'\"TSLO\n0123456789é日本🙂—")
    texts = []
    for i in range(count):
        if i % 2:
            texts.append("".join(rng.choice(chars) for _ in range(rng.randint(0, 40))))
        else:
            texts.append("".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))))
    return texts


@pytest.fixture(scope="module")
def vocab():
    return read_llama2c_vocab(TOK_BIN)


@pytest.fixture(scope="module")
def tok():
    return llama2c_tokenizer(TOK_BIN, vocab_size=512)


# --------------------------------------------------------------------------- behaviour
@needs_stories
def test_readme_prompt_encodes_to_reference_ids(tok):
    ids = tok.encode("Once upon a time, there was a little girl named Lily.", add_special_tokens=False).ids
    assert ids == [403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426]


@needs_stories
def test_encode_and_decode_match_run_c_on_random_text(tok, vocab):
    for text in random_texts(vocab, 600, seed=7):
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == run_c_encode(vocab, text), text
        assert tok.decode([BOS, *ids]) == run_c_decode(vocab, ids), text
        assert tok.decode(ids) == text  # round trip: the dummy-prefix space is stripped again


SENTENCES = [
    "Once upon a time, there was a little girl named Lily.",
    "The dog's ball was red.\nThen it rained 42 days.",
    "Tom said, \"Let's go!\" and ran to the big tree.",
    "café — naïve 日本語 🙂 ™",
    "x",
]


@needs_stories
@pytest.mark.parametrize("text", SENTENCES)
def test_encode_matches_sentencepiece(tok, text):
    """SentencePiece (same vocabulary) agrees on text without repeated or leading/trailing spaces, which it
    normalises away (remove_extra_whitespaces) while run.c keeps them."""
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(TOK_MODEL))
    ids = tok.encode(text, add_special_tokens=False).ids
    assert ids == sp.encode(text)
    assert tok.decode(ids) == sp.decode(ids) == text


@needs_stories
def test_byte_pieces_decode_to_raw_bytes(tok):
    ids = tok.encode("🙂", add_special_tokens=False).ids
    assert ids[1:] == [b + 3 for b in "🙂".encode()]  # after the dummy-prefix space: four <0xXX> pieces
    assert tok.decode(ids) == "🙂"
    assert set(tok.decode(ids[:-1])) == {"\ufffd"}  # an unfinished character decodes to replacement characters


@needs_stories
def test_special_tokens(tok):
    assert [tok.id_to_token(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert tok.encode("Hi").ids[0] == BOS and tok.encode("Hi", add_special_tokens=False).ids[0] != BOS
    assert tok.decode([BOS, 403, 2]) == "Once"
    assert tok.decode([BOS, 403, 2], skip_special_tokens=False) == "<s> Once</s>"


# --------------------------------------------------------------------------- saving and loading
@needs_stories
def test_save_tokenizer_round_trips_and_writes_its_config(tok, tmp_path):
    from kvc.models.loaders.source import GenerationDefaults
    from kvc.runtime.chat_template import ChatTemplate

    generation = GenerationDefaults(eos_token_ids=(2, 1), bos_token_id=1, add_bos=True)
    template = "{% for m in messages %}{{ bos_token }}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    save_tokenizer(tok, tmp_path, generation, chat_template=template)
    again = load_tokenizer(tmp_path)
    for text in SENTENCES:
        assert again.encode(text).ids == tok.encode(text).ids
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["add_bos_token"]) == ("<s>", "</s>", True)
    rendered = ChatTemplate.from_dir(tmp_path).render([{"role": "user", "content": "hi"}])
    assert rendered == "<s>hi</s>"


def test_save_tokenizer_without_generation_writes_no_special_texts(tmp_path):
    from tokenizers import Tokenizer, models

    plain = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    save_tokenizer(plain, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config == {"tokenizer_class": "PreTrainedTokenizerFast"}
    assert load_tokenizer(tmp_path / "tokenizer.json").encode("a").ids == [0]


@pytest.mark.parametrize("content", [None, b"{not json", b'{"model": {"type": "Nope"}}'])
def test_load_tokenizer_refuses_missing_and_malformed_files(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match="cannot load tokenizer .*tokenizer.json"):
        load_tokenizer(path)


# --------------------------------------------------------------------------- malformed llama2.c tokenizers
def write_vocab(path: Path, pieces: list[bytes], max_len: int = 16) -> Path:
    data = struct.pack("<i", max_len)
    for i, piece in enumerate(pieces):
        data += struct.pack("<fi", -float(i), len(piece)) + piece
    path.write_bytes(data)
    return path


def small_vocab() -> list[bytes]:
    return [b"<unk>", b"\n<s>\n", b"\n</s>\n", *(f"<0x{b:02X}>".encode() for b in range(256)),
            b" ", b"a", b"b", b" a", b"ab", b" ab"]


def test_small_vocab_merges_by_score(tmp_path):
    path = write_vocab(tmp_path / "tok.bin", small_vocab())
    tok, vocab = llama2c_tokenizer(path), read_llama2c_vocab(path)
    # " a" (score -262) merges before "ab" (-263), so " ab" is built as (" a", "b"); "bab" has no "ba"/" b".
    expected = {"ab ab": ["▁ab", "▁ab"], "bab": ["▁", "b", "ab"], "aab": ["▁a", "ab"], "": []}
    for text, tokens in expected.items():
        encoding = tok.encode(text, add_special_tokens=False)
        assert encoding.tokens == tokens
        assert encoding.ids == run_c_encode(vocab, text)


def test_truncated_tokenizer_is_refused(tmp_path):
    path = write_vocab(tmp_path / "tok.bin", small_vocab())
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    with pytest.raises(CheckpointError, match="truncated"):
        llama2c_tokenizer(path)
    path.write_bytes(data[:2])
    with pytest.raises(CheckpointError, match="truncated"):
        llama2c_tokenizer(path)


def test_tokenizer_with_wrong_vocab_size_is_refused(tmp_path):
    path = write_vocab(tmp_path / "tok.bin", small_vocab())
    with pytest.raises(CheckpointError, match="265 tokens but the model has 512"):
        llama2c_tokenizer(path, vocab_size=512)


def test_missing_tokenizer_file_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read tokenizer"):
        llama2c_tokenizer(tmp_path / "nope.bin")
