"""Stop conditions: stop strings (brute-force oracle on random chunkings), stop/EOS ids, length, capacity."""
from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kvc.errors import GenerationError
from kvc.runtime.detokenize import IncrementalDetokenizer
from kvc.runtime.sampling import SamplingParams
from kvc.runtime.stopping import (
    FinishReason,
    SequenceStopper,
    StopStringMatcher,
    eos_token_ids_from_generation_config,
)

EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[EOS]
    )
    tokenizer.train_from_iterator(["Hello world. The end is near, the end.", "Grüße 🙂 aus Köln"], trainer)
    return tokenizer


def random_chunks(text: str, rng) -> list[str]:
    cuts = sorted(rng.choice(range(1, len(text)), size=rng.integers(0, len(text) - 1), replace=False))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def test_matcher_against_brute_force_on_random_chunkings(rng):
    stop_strings = ("aba", "bb", "cab")
    for _ in range(300):
        text = "".join(rng.choice(list("abc"), size=int(rng.integers(2, 14))))
        chunks = random_chunks(text, rng)
        matcher, emitted, stopped_at = StopStringMatcher(stop_strings), "", None
        for index, chunk in enumerate(chunks):
            safe, stopped = matcher.push(chunk)
            emitted += safe
            if stopped:
                stopped_at = index
                break
        hits = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
        if not hits:
            assert stopped_at is None and emitted + matcher.flush() == text
            continue
        first_hit = min(hits)
        seen = "".join(chunks[: stopped_at + 1]) if stopped_at is not None else None
        assert emitted == text[:first_hit], (text, chunks)
        # It stops at the first chunk that completes a stop string, not later.
        assert stopped_at is not None and not any(s in "".join(chunks[:stopped_at]) for s in stop_strings)
        assert any(s in seen for s in stop_strings)


def test_matcher_withholds_a_possible_stop_string_start_until_resolved():
    matcher = StopStringMatcher(["</answer>"])
    assert matcher.push("42 </ans") == ("42 ", False)
    assert matcher.push("wer> more") == ("", True)
    matcher = StopStringMatcher(["</answer>"])
    assert matcher.push("a </an") == ("a ", False)
    assert matcher.push("d") == ("</and", False)


def run(stopper: SequenceStopper, ids, capacity_at: int | None = None):
    pieces, reason = [], None
    for count, token_id in enumerate(ids, start=1):
        output = stopper.step(token_id, at_capacity=capacity_at == count)
        pieces.append(output.text)
        if output.finish_reason is not None:
            reason = output.finish_reason
            break
    assert "".join(pieces) == stopper.text
    return stopper.text, reason, stopper.num_generated


def make_stopper(tokenizer, eos_ids=(), **params) -> SequenceStopper:
    return SequenceStopper(SamplingParams(**params), eos_ids, IncrementalDetokenizer(tokenizer, []))


def test_stop_string_spanning_tokens_cuts_the_text_before_it(tokenizer):
    ids = tokenizer.encode("Hello world. The end is near, the end.").ids
    stop = "end is"
    start, end = 17, 17 + len(stop)
    offsets = tokenizer.encode("Hello world. The end is near").offsets
    tokens_of_stop = [(a, b) for a, b in offsets if a < end and b > start]
    assert len(tokens_of_stop) >= 2, "the stop string must span several tokens for this test to mean anything"
    text, reason, count = run(make_stopper(tokenizer, stop_strings=(stop, "nowhere")), ids)
    assert (text, reason) == ("Hello world. The ", FinishReason.STOP)
    assert tokenizer.decode(ids[:count]).startswith("Hello world. The end is")
    assert not tokenizer.decode(ids[: count - 1]).endswith("end is")


def test_eos_ends_the_sequence_and_its_text_is_not_emitted(tokenizer):
    eos = tokenizer.token_to_id(EOS)
    before = tokenizer.encode("Grüße 🙂").ids
    ids = before + [eos] + tokenizer.encode(" aus").ids
    result = run(make_stopper(tokenizer, [eos], max_new_tokens=50), ids)
    assert result == ("Grüße 🙂", FinishReason.EOS, len(before) + 1)


def test_ignore_eos_keeps_going_until_length(tokenizer):
    eos = tokenizer.token_to_id(EOS)
    ids = tokenizer.encode("Hello").ids + [eos] + tokenizer.encode(" world").ids
    text, reason, count = run(make_stopper(tokenizer, [eos], ignore_eos=True, max_new_tokens=len(ids)), ids)
    assert (text, reason, count) == ("Hello world", FinishReason.LENGTH, len(ids))


def test_stop_token_id_finishes_with_stop(tokenizer):
    ids = tokenizer.encode("Hello world. The end").ids
    stop_id = ids[3]
    text, reason, count = run(make_stopper(tokenizer, stop_token_ids=(stop_id,)), ids)
    assert (text, reason, count) == (tokenizer.decode(ids[:3]), FinishReason.STOP, 4)


def test_max_new_tokens_finishes_with_length_and_releases_held_text(tokenizer):
    ids = tokenizer.encode("Hello world. The en").ids
    # "en" could start the stop string, so it is held; at the length limit it is released.
    text, reason, count = run(make_stopper(tokenizer, stop_strings=("end.",), max_new_tokens=len(ids)), ids)
    assert (text, reason, count) == ("Hello world. The en", FinishReason.LENGTH, len(ids))


def test_length_counts_every_token_and_cuts_at_max_new_tokens(tokenizer):
    ids = tokenizer.encode("Hello world. The end is near").ids
    text, reason, count = run(make_stopper(tokenizer, max_new_tokens=3), ids)
    assert (text, reason, count) == (tokenizer.decode(ids[:3]), FinishReason.LENGTH, 3)


def test_full_kv_cache_finishes_with_length(tokenizer):
    ids = tokenizer.encode("Hello world. The end is near").ids
    text, reason, count = run(make_stopper(tokenizer, max_new_tokens=100), ids, capacity_at=5)
    assert (text, reason, count) == (tokenizer.decode(ids[:5]), FinishReason.LENGTH, 5)


def test_unfinished_character_at_the_limit_is_flushed_like_decode(tokenizer):
    ids = tokenizer.encode("🙂").ids
    assert len(ids) > 1
    text, reason, _ = run(make_stopper(tokenizer, max_new_tokens=len(ids) - 1), ids)
    assert (text, reason) == (tokenizer.decode(ids[:-1]), FinishReason.LENGTH)
    assert text.endswith("\ufffd")


def test_step_after_finish_is_refused(tokenizer):
    stopper = make_stopper(tokenizer, max_new_tokens=1)
    assert stopper.step(5).finish_reason is FinishReason.LENGTH
    with pytest.raises(RuntimeError, match="finished"):
        stopper.step(5)


def test_stop_strings_without_a_tokenizer_are_refused():
    with pytest.raises(GenerationError, match="stop_strings"):
        SequenceStopper(SamplingParams(stop_strings=("\n",)), [2], detokenizer=None)


def test_token_only_stopper_works_without_a_tokenizer():
    stopper = SequenceStopper(SamplingParams(max_new_tokens=10), [2], detokenizer=None)
    assert stopper.step(7).finish_reason is None
    assert stopper.step(2).finish_reason is FinishReason.EOS


@pytest.mark.parametrize(
    "config, expected",
    [({"eos_token_id": 2}, {2}), ({"eos_token_id": [128001, 128009]}, {128001, 128009}), ({}, set())],
)
def test_eos_ids_from_generation_config(config, expected):
    assert eos_token_ids_from_generation_config(config) == expected


def test_finish_reasons_are_the_openai_style_strings():
    assert [r.value for r in FinishReason] == ["stop", "eos", "length"]
    assert FinishReason.STOP == "stop"
