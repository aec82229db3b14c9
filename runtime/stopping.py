"""When one sequence is done, and which of its text may be streamed so far.

Per generated token, in this order:
  stop token id -> "stop", EOS id (unless ignore_eos) -> "eos": the token ends the sequence and its text is
  not emitted; otherwise the token's text is decoded, and a stop string completed in the text -> "stop" with
  the text cut before the stop string; max_new_tokens reached or KV capacity full -> "length".
Text that could still become a stop string is withheld until it is resolved, so a streamed stop string
never has to be taken back.
"""
from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from kvc.errors import GenerationError
from kvc.runtime.detokenize import IncrementalDetokenizer
from kvc.runtime.sampling import SamplingParams


class FinishReason(str, enum.Enum):
    STOP = "stop"  # a stop string or stop token id
    EOS = "eos"  # an end-of-sequence token from the generation config
    LENGTH = "length"  # max_new_tokens reached or the KV cache is full


def eos_token_ids_from_generation_config(generation_config: Mapping) -> frozenset[int]:
    """generation_config.json's eos_token_id is an int, a list of ints, or absent."""
    value = generation_config.get("eos_token_id")
    if value is None:
        return frozenset()
    return frozenset([value] if isinstance(value, int) else value)


class StopStringMatcher:
    """Finds stop strings in streamed text, holding back any tail that could begin one."""

    def __init__(self, stop_strings: Sequence[str]):
        self.stop_strings = tuple(stop_strings)
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, stopped). Once stopped, the safe text ends right before the stop string."""
        buffer = self._held + text
        stop_at = self._first_stop_index(buffer)
        if stop_at is not None:
            self._held = ""
            return buffer[:stop_at], True
        keep = self._longest_stop_prefix_suffix(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """The held-back tail, once the sequence ended for another reason."""
        held, self._held = self._held, ""
        return held

    def _first_stop_index(self, buffer: str) -> int | None:
        found = [i for i in (buffer.find(s) for s in self.stop_strings) if i >= 0]
        return min(found) if found else None

    def _longest_stop_prefix_suffix(self, buffer: str) -> int:
        """Length of the longest suffix of buffer that is a proper prefix of some stop string."""
        longest = max((len(s) for s in self.stop_strings), default=1) - 1
        for length in range(min(longest, len(buffer)), 0, -1):
            tail = buffer[-length:]
            if any(s.startswith(tail) for s in self.stop_strings):
                return length
        return 0


@dataclass(frozen=True)
class StepOutput:
    text: str  # newly streamable text (may be empty)
    finish_reason: FinishReason | None  # None while the sequence goes on


class SequenceStopper:
    """Tracks one sequence: decodes its tokens, streams safe text and decides when and why it finishes."""

    def __init__(
        self,
        params: SamplingParams,
        eos_token_ids: Iterable[int],
        detokenizer: IncrementalDetokenizer | None,
    ):
        if params.stop_strings and detokenizer is None:
            raise GenerationError("stop_strings need a tokenizer to decode text; remove them or provide tokenizer.json")
        self.params = params
        self.eos_token_ids = frozenset() if params.ignore_eos else frozenset(eos_token_ids)
        self.stop_token_ids = frozenset(params.stop_token_ids)
        self.detokenizer = detokenizer
        self.matcher = StopStringMatcher(params.stop_strings)
        self.num_generated = 0
        self.text = ""
        self.finish_reason: FinishReason | None = None

    def step(self, token_id: int, at_capacity: bool = False) -> StepOutput:
        """Account for one generated token; at_capacity says the KV cache has no room for another token."""
        if self.finish_reason is not None:
            raise RuntimeError("step() called on a finished sequence")
        self.num_generated += 1
        token_id = int(token_id)
        if token_id in self.stop_token_ids:
            return self._finish(FinishReason.STOP, self._drain()[0])
        if token_id in self.eos_token_ids:
            return self._finish(FinishReason.EOS, self._drain()[0])
        new_text = self.detokenizer.push(token_id) if self.detokenizer is not None else ""
        safe, stopped = self.matcher.push(new_text)
        if stopped:
            return self._finish(FinishReason.STOP, safe)
        if self.num_generated >= self.params.max_new_tokens or at_capacity:
            tail, stopped = self._drain()
            return self._finish(FinishReason.STOP if stopped else FinishReason.LENGTH, safe + tail)
        return self._emit(StepOutput(safe, None))

    def _drain(self) -> tuple[str, bool]:
        """Everything still held by the detokenizer and the matcher, cut at a stop string if one appears."""
        tail = self.detokenizer.flush() if self.detokenizer is not None else ""
        safe, stopped = self.matcher.push(tail)
        return (safe, True) if stopped else (safe + self.matcher.flush(), False)

    def _finish(self, reason: FinishReason, text: str) -> StepOutput:
        self.finish_reason = reason
        return self._emit(StepOutput(text, reason))

    def _emit(self, output: StepOutput) -> StepOutput:
        self.text += output.text
        return output
