"""Response bodies and stream chunks in OpenAI's shapes, for completions and chat completions."""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from kvc.runtime.serving_request import EndReason

# OpenAI knows "stop" and "length": EOS is a stop; a deadline cut is a length limit
_FINISH = {EndReason.STOP: "stop", EndReason.EOS: "stop", EndReason.LENGTH: "length", EndReason.TIMEOUT: "length"}


def finish_reason(end: EndReason | None) -> str | None:
    return None if end is None else _FINISH.get(end, "stop")


@dataclass
class Shape:
    """One response's id, object names and fields: completions ('text') or chat ('message'/'delta')."""
    chat: bool
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex

    def _envelope(self, obj: str, choices: list, usage: dict | None) -> dict:
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body

    def full(self, text: str, end: EndReason | None, usage: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason(end)}
            return self._envelope("chat.completion", [choice], usage)
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(end)}
        return self._envelope("text_completion", [choice], usage)

    def chunk(self, text: str, end: EndReason | None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason(end)}
            return self._envelope("chat.completion.chunk", [choice], None)
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(end)}
        return self._envelope("text_completion", [choice], None)

    def usage_chunk(self, usage: dict) -> dict:
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [], usage)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()
