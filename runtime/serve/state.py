"""What one server process (or one Ray Serve replica) holds: the model, its scheduler, the chat template."""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from kvc.errors import GenerationError
from kvc.runtime.scheduler import Scheduler, SchedulerOptions


@dataclass(frozen=True)
class ServerConfig:
    max_batch: int = 8  # requests decoding together (cache rows; one more row is allocated for prefill)
    model_name: str | None = None  # the id clients pass as "model"; default: the artifact directory's name
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <key>"
    timeout_s: float = 600.0  # per request, from arrival to its last token
    max_body_bytes: int = 1 << 20
    threads: int = 0  # engine threads; 0: the engine's default
    scheduler: SchedulerOptions = field(default_factory=SchedulerOptions)

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise GenerationError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.timeout_s <= 0:
            raise GenerationError(f"timeout must be > 0 seconds, got {self.timeout_s}")


class ServerState:
    def __init__(self, model, config: ServerConfig):
        self.model, self.config = model, config
        self.model_name = config.model_name or Path(model.root).name
        self.scheduler = Scheduler(model, config.scheduler)
        self.chat_template, self.chat_error = _chat_template(model.root)
        self.http_responses: Counter[int] = Counter()  # status code -> responses (/v1 only)

    @classmethod
    def load(cls, artifact: str | os.PathLike, config: ServerConfig) -> "ServerState":
        from kvc.runtime.model import LoadOptions, load

        model = load(artifact, LoadOptions(max_batch=config.max_batch + 1, threads=config.threads))
        return cls(model, config)

    def start(self) -> "ServerState":
        self.scheduler.start()
        return self

    def close(self) -> None:
        self.scheduler.close()


def _chat_template(root):
    from kvc.runtime.chat_template import ChatTemplate

    try:
        return ChatTemplate.from_dir(root), ""
    except GenerationError as exc:
        return None, str(exc)
