"""Chat templates: the Jinja2 program in a checkpoint that turns messages into the prompt text.

Templates come from model repositories, i.e. from strangers, so they run in Jinja2's immutable sandbox
with limits (``RenderLimits``): steps of template code (counted by a trace function on the template's
own frames, so loops with empty bodies count too), output size, and the size of strings, lists and
numbers that ``*`` / ``**`` may build.
The environment matches transformers' apply_chat_template (trim_blocks, lstrip_blocks, loop controls,
tojson without HTML escaping, raise_exception, strftime_now) so both render the same prompt.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_STEPS = 2_000_000  # lines of compiled template code per render (real chat templates use < 10^4)
MAX_OUTPUT_CHARS = 4 << 20  # a prompt larger than this cannot fit any cache anyway
MAX_BUILT_ITEMS = 1 << 20  # "x" * n, [..] * n
MAX_EXPONENT = 1024

from kvc.errors import GenerationError

TEMPLATE_FILE = "chat_template.jinja"  # transformers >= 4.50 saves the template here
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    bos_token: str = ""
    eos_token: str = ""

    @classmethod
    def from_tokenizer_config(cls, config: Mapping, template_file_text: str | None = None) -> ChatTemplate:
        """Read the template (a string, or HF's list of named templates) and special tokens from tokenizer_config."""
        source = template_file_text if template_file_text is not None else _pick_template(config.get("chat_template"))
        if not source:
            raise GenerationError(
                "the tokenizer has no chat template; pass the prompt as plain text instead of chat messages"
            )
        return cls(source, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")))

    @classmethod
    def from_dir(cls, directory: str | Path) -> ChatTemplate:
        """Load from a checkpoint or artifact directory holding tokenizer_config.json (and chat_template.jinja)."""
        directory = Path(directory)
        config_path = directory / TOKENIZER_CONFIG_FILE
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        template_path = directory / TEMPLATE_FILE
        template_text = template_path.read_text(encoding="utf-8") if template_path.is_file() else None
        return cls.from_tokenizer_config(config, template_text)

    def render(self, messages: Sequence[Mapping], add_generation_prompt: bool = True) -> str:
        """The prompt text for messages [{"role": ..., "content": ...}], ending with the assistant's turn opener."""
        template = _compile(self.source)
        context = dict(messages=_plain_messages(messages), add_generation_prompt=add_generation_prompt,
                       bos_token=self.bos_token, eos_token=self.eos_token)
        try:
            return _bounded_render(template, context)
        except jinja2.TemplateError as error:
            raise GenerationError(
                f"the chat template refused the messages: {error}; check the roles and their order"
            ) from None


def _pick_template(value: object) -> str | None:
    if isinstance(value, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {entry.get("name"): entry.get("template") for entry in value if isinstance(entry, Mapping)}
        return named.get("default")
    return value if isinstance(value, str) else None


def _token_text(value: object) -> str:
    """Special tokens are saved as a string or as a serialized AddedToken {"content": ...}."""
    if isinstance(value, Mapping):
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""


def _plain_messages(messages: Sequence[Mapping]) -> list[dict]:
    """Copies messages as plain dicts of strings, so the template sees no caller objects."""
    plain = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise GenerationError(f"message {index} must be a dict with a string 'role', got {message!r}")
        if not isinstance(message.get("content"), str):
            raise GenerationError(f"message {index} must have string 'content', got {message.get('content')!r}")
        plain.append({"role": message["role"], "content": message["content"]})
    return plain


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as error:
        raise GenerationError(f"the chat template is not valid Jinja2 (line {error.lineno}: {error.message})") from None


class _StepBudget:
    """A trace function counting line events in the template's compiled code only (its frames carry the
    filename "<template>"); raises once the budget is spent."""

    def __init__(self, limit: int):
        self.left = limit

    def __call__(self, frame, event, arg):
        if frame.f_code.co_filename != "<template>":
            return None  # no line tracing of Python code the template calls
        return self._line

    def _line(self, frame, event, arg):
        if event == "line":
            self.left -= 1
            if self.left < 0:
                raise _LimitExceeded(f"it ran more than {MAX_STEPS} steps")
        return self._line


class _LimitExceeded(jinja2.TemplateError):
    pass


def _bounded_render(template: jinja2.Template, context: dict) -> str:
    previous = sys.gettrace()
    sys.settrace(_StepBudget(MAX_STEPS))
    try:
        pieces, size = [], 0
        for piece in template.generate(**context):
            size += len(piece)
            if size > MAX_OUTPUT_CHARS:
                raise _LimitExceeded(f"its output passed {MAX_OUTPUT_CHARS} characters")
            pieces.append(piece)
        return "".join(pieces)
    except RecursionError:
        raise GenerationError("the chat template was stopped: it recursed too deeply; it is not a usable chat "
                              "template (render the prompt yourself and pass it as text)") from None
    except _LimitExceeded as error:
        raise GenerationError(f"the chat template was stopped: {error}; it is not a usable chat template "
                              "(render the prompt yourself and pass it as text)") from None
    finally:
        sys.settrace(previous)


class _LimitedSandbox(ImmutableSandboxedEnvironment):
    """Refuses ``*`` and ``**`` results too large to build (the sandbox itself only bounds range())."""

    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(count, int) and len(seq) * count > MAX_BUILT_ITEMS:
                    raise _LimitExceeded(f"it builds a sequence of more than {MAX_BUILT_ITEMS} items")
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > MAX_EXPONENT:
            raise _LimitExceeded(f"it raises to a power above {MAX_EXPONENT}")
        return super().call_binop(context, operator, left, right)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = _LimitedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters, which templates for prompts do not want.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)
