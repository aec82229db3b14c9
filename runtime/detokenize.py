"""Streaming detokenization: text for each generated token, never half a character.

Each push decodes a short window of ids twice, without and with the tokens not yet emitted, and emits the
difference. Decoding with the preceding tokens as context gets SentencePiece's leading spaces right (its
decoder strips the space of the first token it sees, which must be a context token, not a new one). While
the window's text ends in U+FFFD, the last tokens are byte pieces of an unfinished UTF-8 character (byte
fallback <0xE2><0x82>... or byte-level BPE), so they are held until the character completes.
"""
from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
PROMPT_CONTEXT_TOKENS = 5  # prompt ids decoded as context for the first generated tokens
MAX_UTF8_BYTES = 4


class IncrementalDetokenizer:
    """push(id) -> new text; the pushes plus flush() concatenate to the text the generated ids add after the
    prompt, i.e. decode(prompt + generated) minus decode(prompt) (= decode(generated) unless the tokenizer
    strips a leading space, which a continuation must keep)."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = self._prompt_context([int(i) for i in prompt_ids])
        self._ids: list[int] = context
        self._prefix_offset = 0  # window start: context for the tokens being decoded
        self._read_offset = len(context)  # first id whose text has not been emitted
        self.generated_ids: list[int] = []

    def push(self, token_id: int) -> str:
        """Append one generated id; return the text it completes (possibly empty)."""
        token_id = int(token_id)
        self._ids.append(token_id)
        self.generated_ids.append(token_id)
        emitted_text = self._decode(self._prefix_offset, self._read_offset)
        window_text = self._decode(self._prefix_offset, len(self._ids))
        if window_text.endswith(REPLACEMENT_CHAR) or len(window_text) < len(emitted_text):
            return ""  # an unfinished character (or no new text yet): wait for more bytes
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return window_text[len(emitted_text) :]

    def flush(self) -> str:
        """Text still held at the end of generation; an unfinished character decodes to U+FFFD, as decode() does."""
        if self._read_offset == len(self._ids):
            return ""
        emitted_text = self._decode(self._prefix_offset, self._read_offset)
        window_text = self._decode(self._prefix_offset, len(self._ids))
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return window_text[len(emitted_text) :]

    def _prompt_context(self, prompt_ids: list[int]) -> list[int]:
        """The last few prompt ids, starting on a character boundary: a window starting inside a character's
        byte tokens would decode them, grouped with what follows, differently from the full decode."""
        start = max(0, len(prompt_ids) - PROMPT_CONTEXT_TOKENS)
        for candidate in range(start, max(0, start - MAX_UTF8_BYTES) - 1, -1):
            if not self._decode_ids(prompt_ids[candidate:]).startswith(REPLACEMENT_CHAR):
                return prompt_ids[candidate:]
        return prompt_ids[start:]

    def _decode(self, start: int, stop: int) -> str:
        return self._decode_ids(self._ids[start:stop])

    def _decode_ids(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
