"""``kvc.load(path)``: a validated artifact behind an engine-agnostic model object."""
from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvc.contract import TOKENIZER_FILE, EngineKind
from kvc.errors import GenerationError, KvcError
from kvc.runtime.artifact import Manifest, validate_artifact
from kvc.runtime.engine import check_token_ids
from kvc.runtime.generate import (GenerationResult, GenerationRun, Overflow, OverflowPolicy, PrefixHit,
                                  TextEvent)
from kvc.runtime.sampling import SamplingParams

Prompt = str | Sequence[int]


DEVICES = ("cpu", "cuda")
MAX_BATCH_LIMIT = 4096  # cache rows; far above what fits in memory for any real model


@dataclass(frozen=True)
class LoadOptions:
    device: str = "cpu"  # "cpu" | "cuda"
    max_batch: int = 1  # cache rows allocated at load
    verify_hashes: bool = True
    threads: int = 0  # 0: the engine's default

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            hint = " (NVIDIA GPUs are 'cuda')" if self.device == "gpu" else ""
            raise KvcError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}{hint}")
        for name, low, high in (("max_batch", 1, MAX_BATCH_LIMIT), ("threads", 0, 1024)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
                raise KvcError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        if not isinstance(self.verify_hashes, bool):
            raise KvcError(f"verify_hashes must be True or False, got {self.verify_hashes!r}")


class KvcModel:
    def __init__(self, root: Path, manifest: Manifest, engine, tokenizer):
        self.root, self.manifest, self.engine, self.tokenizer = root, manifest, engine, tokenizer
        self.generation_defaults = dict(manifest.generation)
        self._prefixes: dict[tuple[int, ...], PrefixHit] = {}
        # One engine, one set of cache rows: a run holds the lock from its first step to its last, across
        # threads (others wait); a thread starting a second run while its own stream is suspended would
        # deadlock, so that is refused (_owner).
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._reserved_by: str | None = None  # a long-lived driver holding the lock (kvc serve's scheduler)

    @contextmanager
    def _exclusive(self):
        """Hold the model's engine for one run (see __init__)."""
        me = threading.get_ident()
        if self._owner == me:
            raise GenerationError("this model is already running a generation on this thread (a stream() not "
                                  "yet exhausted or closed); finish or close() it first, or load a second model")
        while not self._lock.acquire(timeout=0.05):
            self._refuse_if_reserved()
        self._owner = me
        try:
            yield
        finally:
            self._owner = None
            self._lock.release()

    def _refuse_if_reserved(self) -> None:
        holder = self._reserved_by
        if holder is not None:
            raise GenerationError(f"this model is driven by {holder}, which owns its cache rows; load a second "
                                  "model to run generations beside it")

    def reserve(self, holder: str) -> None:
        """Hand the engine to a long-lived driver (``holder`` names it) until release(): runs started
        meanwhile are refused naming it, instead of interleaving with its steps or waiting for it forever.
        Refused while a run holds the model."""
        self._refuse_if_reserved()
        if not self._lock.acquire(blocking=False):
            raise GenerationError(f"this model is running a generation; {holder} needs it to itself: let the "
                                  "generation finish, or load a second model")
        self._reserved_by = holder

    def release(self) -> None:
        """End a reserve(); may be called from another thread than the one that reserved."""
        if self._reserved_by is None:
            raise GenerationError("release() without reserve()")
        self._reserved_by = None
        self._lock.release()

    # --- low level: what `kvc bench` and the tests drive directly ---
    @property
    def capacity(self) -> int:
        return self.engine.capacity

    def prefill(self, input_ids: np.ndarray, past_len: np.ndarray | None = None) -> np.ndarray:
        """Run prompt tokens [B, S] after ``past_len`` tokens per row (default 0); logits [B, S, V]."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        past = np.zeros(input_ids.shape[0], np.int64) if past_len is None else np.asarray(past_len, np.int64)
        positions = past[:, None] + np.arange(input_ids.shape[1], dtype=np.int64)[None, :]
        with self._exclusive():
            return self.engine.forward(input_ids, positions, past)

    def decode(self, tokens: np.ndarray, past_len: np.ndarray) -> np.ndarray:
        """One token per row [B] after ``past_len`` tokens; logits [B, V]."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)
        past = np.asarray(past_len, dtype=np.int64)
        with self._exclusive():
            return self.engine.forward(tokens, past[:, None], past)[:, -1]

    # --- text ---
    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.generation_defaults.get("eos_token_ids") or self.manifest.limits.eos_token_ids
        return tuple(eos)

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt; text gets the model's BOS unless it already starts with it
        (chat templates usually write it themselves)."""
        if isinstance(prompt, (bytes, bytearray, memoryview)):
            raise GenerationError("prompts are str (text) or a list of token ids, got bytes; decode them first, "
                                  "e.g. prompt.decode('utf-8')")
        if not isinstance(prompt, str):
            if not isinstance(prompt, (Sequence, np.ndarray)) or not all(
                    isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt):
                raise GenerationError(f"a prompt is str or a sequence of int token ids, got {type(prompt).__name__}")
            ids = [int(t) for t in prompt]
            check_token_ids(ids, self.manifest.limits.vocab_size)
            return ids
        if self.tokenizer is None:
            raise GenerationError("this artifact has no tokenizer.json; pass token ids instead of text")
        ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        bos = self.generation_defaults.get("bos_token_id", self.manifest.limits.bos_token_id)
        wants_bos = self.generation_defaults.get("add_bos", bos is not None) and bos is not None
        if wants_bos and (not ids or ids[0] != int(bos)):
            ids = [int(bos)] + ids
        check_token_ids(ids, self.manifest.limits.vocab_size)  # a tokenizer bigger than the model's vocab
        return ids

    def _run(self, prompts: Sequence[Prompt], params: SamplingParams,
             overflow: Overflow | OverflowPolicy) -> GenerationRun:
        ids = [self.encode(p) for p in prompts]
        return GenerationRun(self.engine, ids, params, self.eos_token_ids, self.tokenizer, overflow,
                             prefix=self._find_prefix(ids), bytes_per_token=self.kv_bytes_per_token(),
                             sliding_window=self.manifest.cache.narrowest_window,
                             max_positions=self.manifest.limits.max_positions)

    def generate(self, prompt: Prompt | list[Prompt], params: SamplingParams = SamplingParams(temperature=0.0),
                 overflow: Overflow | OverflowPolicy = Overflow()) -> GenerationResult | list[GenerationResult]:
        """Generate for one prompt (str or ids) or a list of prompts (batched, rows independent).

        ``overflow``: what to do past the cache capacity, e.g. ``Overflow(OverflowPolicy.SLIDE,
        sink_tokens=4)`` (a bare OverflowPolicy is accepted too); see kvc.runtime.generate.Overflow."""
        if isinstance(prompt, (bytes, bytearray, memoryview)):
            self.encode(prompt)  # the one error for bytes
        single = isinstance(prompt, str) or (len(prompt) > 0 and isinstance(prompt[0], (int, np.integer)))
        prompts = [prompt] if single else list(prompt)
        with self._exclusive():
            run = self._run(prompts, params, overflow)
            for _ in run.events():
                pass
        results = run.results()
        return results[0] if single else results

    def stream(self, prompt: Prompt, params: SamplingParams = SamplingParams(temperature=0.0),
               overflow: Overflow | OverflowPolicy = Overflow()) -> Iterator[TextEvent]:
        """Yield text pieces as they are generated; the last event carries the finish reason.
        After the iterator is exhausted, ``self.last_result`` holds the full GenerationResult."""
        with self._exclusive():
            run = self._run([prompt], params, overflow)
            yield from run.events()
            self.last_result = run.results()[0]  # set under the lock: the last run to finish

    # --- prefix cache ---
    def cache_prefix(self, prefix: Prompt) -> int:
        """Prefill ``prefix`` (e.g. a system prompt) once and keep its KV; later prompts starting
        with it skip those tokens. Returns the number of cached tokens."""
        ids = self.encode(prefix)
        if len(ids) >= self.capacity:
            raise GenerationError(f"prefix of {len(ids)} tokens does not fit the cache capacity {self.capacity}")
        with self._exclusive():
            ids_array = np.array([ids], dtype=np.int64)
            self.engine.forward(ids_array, np.arange(len(ids), dtype=np.int64)[None, :], np.zeros(1, np.int64))
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
    if not isinstance(options, LoadOptions):
        raise KvcError(f"options must be a kvc.LoadOptions, got {type(options).__name__}")
    root = Path(path)
    manifest = validate_artifact(root, verify_hashes=options.verify_hashes)
    tokenizer = _load_tokenizer(root, manifest)  # before the engine: a bad tokenizer loads no native code
    engine = _make_engine(root, manifest, options)
    return KvcModel(root, manifest, engine, tokenizer)


def _load_tokenizer(root: Path, manifest: Manifest):
    """The artifact's tokenizer.json (the fixed name, listed and hashed), or None when it has none."""
    if TOKENIZER_FILE not in manifest.files:
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(root / TOKENIZER_FILE))
    except Exception as exc:  # tokenizers raises plain Exception for malformed files
        raise KvcError(f"{TOKENIZER_FILE} in the artifact cannot be read ({str(exc)[:200]}); recompile") from None


def _make_engine(root: Path, manifest: Manifest, options: LoadOptions):
    if manifest.engine is EngineKind.ORT:
        from kvc.runtime.ort_engine import OrtEngine, OrtEngineOptions

        return OrtEngine(root, manifest, OrtEngineOptions(device=options.device, max_batch=options.max_batch,
                                                          intra_op_threads=options.threads))
    from kvc.runtime.tvm_engine import TvmEngine, TvmEngineOptions

    return TvmEngine(root, manifest, TvmEngineOptions(device=options.device, max_batch=options.max_batch,
                                                      threads=options.threads))
