"""stories260K, a real pretrained tiny Llama in llama2.c's formats, against llama2.c run.c's own output.

The reference ids and text are those of ../shared/models/stories260K/README.md (greedy decoding from BOS,
256 steps, produced by run.c and an independent implementation). Matching them checks the .bin reader, the
adjacent-pair -> rotate-half RoPE permutation, GQA, the explicit KV path and the converted tokenizer.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvc.models import empty_past

STORIES = Path(__file__).resolve().parents[2].parent / "shared" / "models" / "stories260K"
pytestmark = pytest.mark.skipif(not (STORIES / "stories260K.bin").is_file(),
                                reason=f"stories260K checkpoint not found at {STORIES}")

BOS = 1
REFERENCE_IDS = [403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337,
                 410, 408, 419, 292, 411, 322, 265, 282, 295, 433, 426, 385]
REFERENCE_TEXT = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw "
    "a big, red ball. She wanted to play with it, but it was too high.\n"
    "Lily's mom said, \"Lily, let's go to the park.\" Lily was sad and didn't know what to do. She said, \"I want to "
    "play with your ball, but I can't find it.\"\n"
    "Lily was sad and didn't know what to do. She said, \"I'm sorry, Lily. I didn't know what to do.\"\n"
    "Lily didn't want to help her mom, so she said, \"I'm sorry, mom. I didn't know what to do.\" Her mom said, "
    "\"Don't worry, Lily. We can help you.")
PROMPT = "Once upon a time, there was a little girl named Lily."
PROMPT_IDS = [403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426]
STEPS = 256  # run.c's -n 256: forward passes at positions 0..255, each yielding one token


@pytest.fixture(scope="module")
def loaded():
    from kvc.models.loaders.source import load_source

    return load_source(str(STORIES / "stories260K.bin"))


@pytest.fixture(scope="module")
def greedy_from_bos(loaded) -> list[int]:
    """32 greedy ids after BOS, one token per forward call with the explicit past KV."""
    model, config = loaded.model, loaded.config
    past, token, out = empty_past(config, 1), BOS, []
    with torch.no_grad():
        for pos in range(len(REFERENCE_IDS)):
            logits, past = model(torch.tensor([[token]]), torch.ones(1, pos + 1, dtype=torch.long),
                                 torch.tensor([[pos]]), past)
            token = int(logits[0, -1].argmax())
            out.append(token)
    return out


def test_config_read_from_the_header(loaded):
    c = loaded.config
    assert (c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads, c.vocab_size,
            c.max_position_embeddings) == (64, 172, 5, 8, 4, 512, 512)
    assert c.tie_word_embeddings and c.norm_eps == 1e-5 and c.rope_theta == 10000.0
    assert loaded.source_kind.value == "llama2c" and loaded.tokenizer is not None  # tok512.bin found beside it
    # run.c prepends BOS and stops when the model emits BOS; EOS stays the first stop id.
    generation = loaded.generation
    assert generation.eos_token_ids == (2, 1) and generation.add_bos and generation.bos_token_id == 1


def test_greedy_first_32_ids_match_run_c(greedy_from_bos):
    assert greedy_from_bos[:32] == REFERENCE_IDS


def test_reference_text_is_the_greedy_continuation_at_every_one_of_256_steps(loaded):
    """One prefill of BOS + the encoded 256-step reference text: at every position the model's argmax is the
    next token, so greedy decoding reproduces the text, and the tokenizer encodes it as run.c generated it."""
    ids = loaded.tokenizer.encode(REFERENCE_TEXT).ids
    assert len(ids) == 1 + STEPS and ids[1:33] == REFERENCE_IDS
    with torch.no_grad():
        logits, _ = loaded.model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),
                                 torch.arange(len(ids))[None], empty_past(loaded.config, 1))
    assert logits[0, :-1].argmax(-1).tolist() == ids[1:]
    assert loaded.tokenizer.decode(ids) == REFERENCE_TEXT


def test_first_32_ids_decode_to_the_reference_prefix(loaded):
    text = loaded.tokenizer.decode([BOS, *REFERENCE_IDS])
    assert text == "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One"
    assert REFERENCE_TEXT.startswith(text)


def test_prompt_encodes_to_reference_ids(loaded):
    assert loaded.tokenizer.encode(PROMPT, add_special_tokens=False).ids == PROMPT_IDS
    assert loaded.tokenizer.encode(PROMPT).ids == [BOS, *PROMPT_IDS]  # the post-processor adds BOS
