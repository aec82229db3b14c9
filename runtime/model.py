"""``kvc.load(path)``: a validated artifact behind an engine-agnostic model object."""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvc.errors import GenerationError
from kvc.runtime.artifact import Manifest, validate_artifact
from kvc.runtime.generate import (GenerationResult, GenerationRun, Overflow, OverflowPolicy, PrefixHit,
                                  TextEvent)
from kvc.runtime.sampling import SamplingParams

Prompt = str | Sequence[int]


@dataclass(frozen=True)
class LoadOptions:
    device: str = "cpu"  # "cpu" | "cuda"
    max_batch: int = 1  # cache rows allocated at load
    verify_hashes: bool = True
    threads: int = 0  # 0: the engine's default


class KvcModel:
    def __init__(self, root: Path, manifest: Manifest, engine, tokenizer):
        self.root, self.manifest, self.engine, self.tokenizer = root, manifest, engine, tokenizer
        self.generation_defaults = dict(manifest.generation)
        self._prefixes: dict[tuple[int, ...], PrefixHit] = {}

    # --- low level: what `kvc bench` and the tests drive directly ---
    @property
    def capacity(self) -> int:
        return self.engine.capacity

    def prefill(self, input_ids: np.ndarray, past_len: np.ndarray | None = None) -> np.ndarray:
        """Run prompt tokens [B, S] after ``past_len`` tokens per row (default 0); logits [B, S, V]."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        past = np.zeros(input_ids.shape[0], np.int64) if past_len is None else np.asarray(past_len, np.int64)
        positions = past[:, None] + np.arange(input_ids.shape[1], dtype=np.int64)[None, :]
        return self.engine.forward(input_ids, positions, past)

    def decode(self, tokens: np.ndarray, past_len: np.ndarray) -> np.ndarray:
        """One token per row [B] after ``past_len`` tokens; logits [B, V]."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)
        past = np.asarray(past_len, dtype=np.int64)
        return self.engine.forward(tokens, past[:, None], past)[:, -1]

    # --- text ---
    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.generation_defaults.get("eos_token_ids") or self.manifest.model.get("eos_token_ids") or ()
        return tuple(eos)

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt; text gets the model's BOS unless it already starts with it
        (chat templates usually write it themselves)."""
        if not isinstance(prompt, str):
            return [int(t) for t in prompt]
        if self.tokenizer is None:
            raise GenerationError("this artifact has no tokenizer.json; pass token ids instead of text")
        ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        bos = self.generation_defaults.get("bos_token_id", self.manifest.model.get("bos_token_id"))
        wants_bos = self.generation_defaults.get("add_bos", bos is not None) and bos is not None
        if wants_bos and (not ids or ids[0] != int(bos)):
            ids = [int(bos)] + ids
        return ids

    def _run(self, prompts: Sequence[Prompt], params: SamplingParams,
             overflow: Overflow | OverflowPolicy) -> GenerationRun:
        ids = [self.encode(p) for p in prompts]
        return GenerationRun(self.engine, ids, params, self.eos_token_ids, self.tokenizer, overflow,
                             prefix=self._find_prefix(ids), bytes_per_token=self.kv_bytes_per_token(),
                             sliding_window=self.manifest.cache.sliding_window)

    def generate(self, prompt: Prompt | list[Prompt], params: SamplingParams = SamplingParams(temperature=0.0),
                 overflow: Overflow | OverflowPolicy = Overflow()) -> GenerationResult | list[GenerationResult]:
        """Generate for one prompt (str or ids) or a list of prompts (batched, rows independent).

        ``overflow``: what to do past the cache capacity, e.g. ``Overflow(OverflowPolicy.SLIDE,
        sink_tokens=4)`` (a bare OverflowPolicy is accepted too); see kvc.runtime.generate.Overflow."""
        single = isinstance(prompt, str) or (len(prompt) > 0 and isinstance(prompt[0], (int, np.integer)))
        prompts = [prompt] if single else list(prompt)
        run = self._run(prompts, params, overflow)
        for _ in run.events():
            pass
        results = run.results()
        return results[0] if single else results

    def stream(self, prompt: Prompt, params: SamplingParams = SamplingParams(temperature=0.0),
               overflow: Overflow | OverflowPolicy = Overflow()) -> Iterator[TextEvent]:
        """Yield text pieces as they are generated; the last event carries the finish reason.
        After the iterator is exhausted, ``self.last_result`` holds the full GenerationResult."""
        run = self._run([prompt], params, overflow)
        yield from run.events()
        self.last_result = run.results()[0]

    # --- prefix cache ---
    def cache_prefix(self, prefix: Prompt) -> int:
        """Prefill ``prefix`` (e.g. a system prompt) once and keep its KV; later prompts starting
        with it skip those tokens. Returns the number of cached tokens."""
        ids = self.encode(prefix)
        if len(ids) >= self.capacity:
            raise GenerationError(f"prefix of {len(ids)} tokens does not fit the cache capacity {self.capacity}")
        self.prefill(np.array([ids], dtype=np.int64))
        self._prefixes[tuple(ids)] = PrefixHit(len(ids), self.engine.read_slots(0, len(ids)))
        return len(ids)

    def clear_prefix_cache(self) -> None:
        self._prefixes.clear()

    def _find_prefix(self, prompts: list[list[int]]) -> PrefixHit | None:
        """The longest cached prefix shared by every prompt, leaving each at least one token to run."""
        best = None
        for key, hit in self._prefixes.items():
            if all(len(p) > hit.length and tuple(p[: hit.length]) == key for p in prompts):
                if best is None or hit.length > best.length:
                    best = hit
        return best

    # --- memory ---
    def kv_bytes_per_token(self) -> int:
        """Bytes of cache (all layers, K and V, scales included) one token occupies in one row."""
        return self.engine.cache_nbytes() // (self.engine.max_batch * self.capacity)


def load(path: str | os.PathLike, options: LoadOptions = LoadOptions()) -> KvcModel:
    """Validate the artifact (format, versions, paths, hashes) before any engine code loads it."""
    root = Path(path)
    manifest = validate_artifact(root, verify_hashes=options.verify_hashes)
    engine = _make_engine(root, manifest, options)
    tokenizer = None
    if (root / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
    return KvcModel(root, manifest, engine, tokenizer)


def _make_engine(root: Path, manifest: Manifest, options: LoadOptions):
    if manifest.engine == "ort":
        from kvc.runtime.ort_engine import OrtEngine, OrtEngineOptions

        return OrtEngine(root, manifest, OrtEngineOptions(device=options.device, max_batch=options.max_batch,
                                                          intra_op_threads=options.threads))
    from kvc.runtime.tvm_engine import TvmEngine, TvmEngineOptions

    return TvmEngine(root, manifest, TvmEngineOptions(device=options.device, max_batch=options.max_batch,
                                                      threads=options.threads))
