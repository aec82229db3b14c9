"""Request bodies of /v1/completions and /v1/chat/completions, validated as OpenAI does.

Unknown fields are refused ("Unrecognized request argument supplied: x"), types are strict (no "0.5"
for a number, no true for an integer). OpenAI fields kvc does not implement are accepted only at their
neutral value (n=1, penalties 0, no logprobs, ...), otherwise refused by name. ``top_k``, ``min_p``,
``repetition_penalty`` and ``ignore_eos`` are kvc extensions (the ``extra_body`` of OpenAI clients).
"""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvc.errors import GenerationError
from kvc.runtime.sampling import SamplingParams
from kvc.runtime.serve.errors import ApiError, bad_request

MAX_STOP_SEQUENCES = 4
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # kvc extensions
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False

    def unsupported(self) -> list[tuple[str, bool]]:
        """(field, set to a value kvc cannot honour)."""
        return [("n", self.n != 1), ("presence_penalty", self.presence_penalty != 0.0),
                ("frequency_penalty", self.frequency_penalty != 0.0), ("logit_bias", bool(self.logit_bias))]


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    def unsupported(self) -> list[tuple[str, bool]]:
        return super().unsupported() + [("echo", self.echo), ("suffix", self.suffix is not None),
                                        ("best_of", self.best_of not in (None, 1)), ("logprobs", bool(self.logprobs))]

    def single_prompt(self) -> str | list[int]:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise bad_request(f"{len(prompt)} prompts in one request; kvc serves one prompt per request",
                                  param="prompt")
            prompt = prompt[0]
        if len(prompt) == 0:
            raise bad_request("prompt is empty", param="prompt")
        return prompt


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    # OpenAI fields that do not change what is generated: accepted and ignored
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None

    def unsupported(self) -> list[tuple[str, bool]]:
        return super().unsupported() + [("logprobs", self.logprobs), ("top_logprobs", bool(self.top_logprobs)),
                                        ("tools", bool(self.tools)), ("tool_choice", self.tool_choice not in (None, "none"))]

    def plain_messages(self) -> list[dict[str, str]]:
        # templates know "system"; OpenAI's newer "developer" role means the same
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


def parse_body(raw: bytes, model: type[_Sampling]) -> _Sampling:
    """Bytes of a request body -> a validated request, or a 400 ApiError saying what is wrong."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        request = model.model_validate(data)
    except ValidationError as exc:
        raise _from_validation(exc) from None
    for name, bad in request.unsupported():
        if bad:
            raise bad_request(f"{name}={getattr(request, name)!r} is not supported by kvc serve", param=name)
    return request


def _from_validation(exc: ValidationError) -> ApiError:
    first = exc.errors(include_url=False)[0]
    field = ".".join(str(p) for p in first["loc"] if not _is_union_tag(p)) or None
    if first["type"] == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {field}", param=field)
    if first["type"] == "missing":
        return bad_request(f"Missing required parameter: '{field}'", param=field)
    return bad_request(f"Invalid value for '{field}': {first['msg']}", param=field)


def _is_union_tag(part) -> bool:
    """pydantic names the member of a union it tried ('str', 'list[int]', 'TextPart') in the location."""
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or part[:1].isupper())


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict"}


def sampling_params(request: _Sampling, max_tokens: int) -> SamplingParams:
    """SamplingParams of a request; ``max_tokens``: the endpoint's choice when the request sets none."""
    temperature = 1.0 if request.temperature is None else request.temperature
    if not 0.0 <= temperature <= 2.0:
        raise bad_request(f"temperature={temperature} is invalid: must be in [0, 2]", param="temperature")
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > MAX_STOP_SEQUENCES:
        raise bad_request(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stop)}", param="stop")
    try:
        return SamplingParams(temperature=temperature, top_p=1.0 if request.top_p is None else request.top_p,
                              top_k=request.top_k, min_p=request.min_p,
                              repetition_penalty=request.repetition_penalty, seed=request.seed,
                              max_new_tokens=max_tokens, stop_strings=tuple(stop), ignore_eos=request.ignore_eos)
    except GenerationError as exc:
        raise bad_request(str(exc), param=str(exc).split("=")[0]) from None
