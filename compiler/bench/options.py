"""Typed settings of `kvc bench` and the parsing of its comma-separated lists."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from kvc.contract import KV_DTYPE_NAMES, WeightDtype
from kvc.errors import KvcError

KV_DTYPES = KV_DTYPE_NAMES
BASELINE_KV_DTYPE = "fp32"  # the baselines (torch-concat, torch-static, ort-concat) always hold an fp32 cache


class EngineName(str, enum.Enum):
    KVC_ORT = "kvc-ort"  # kvc artifact, ONNX Runtime engine (ring buffer, in-place IO binding)
    KVC_TVM = "kvc-tvm"  # kvc artifact, TVM engine
    ORT_CONCAT = "ort-concat"  # ONNX Runtime on the plain concat export: past fed back and copied each step
    TORCH_CONCAT = "torch-concat"  # PyTorch eager on kvc's own model, concat KV (torch.cat), torch.no_grad
    TORCH_STATIC = "torch-static"  # PyTorch eager, static preallocated KV written in place (gpt-fast style)
    TORCH = "torch-concat"  # alias: `--engines torch` meant the concat baseline before torch-static existed

    @property
    def is_kvc(self) -> bool:
        return self in (EngineName.KVC_ORT, EngineName.KVC_TVM)

    @property
    def has_capacity(self) -> bool:
        """Preallocates its cache for a capacity (so `--capacity` applies to it)."""
        return self.is_kvc or self is EngineName.TORCH_STATIC

    @property
    def compile_engine(self) -> str:
        """The `kvc compile --engine` value of a kvc engine."""
        return {EngineName.KVC_ORT: "ort", EngineName.KVC_TVM: "tvm"}[self]


class FillMode(str, enum.Enum):
    """How the cache reaches depth `context` before decode is timed."""

    REAL = "real"  # a real prefill of a random `context`-token prompt (minutes at 8192 on 2 cores)
    SYNTHETIC = "synthetic"  # K/V of a short real prefill, tiled to `context` slots and written straight in


ENGINE_ALIASES = {"torch": EngineName.TORCH_CONCAT.value}


@dataclass(frozen=True)
class BenchConfig:
    contexts: tuple[int, ...] = (128, 512, 2048, 8192)  # cache depths at which decode is timed
    gen: int = 64  # decode steps timed per repetition
    kv_dtypes: tuple[str, ...] = ("fp32",)  # cache dtypes of the kvc engines
    engines: tuple[EngineName, ...] = tuple(EngineName)
    batch: int = 1
    reps: int = 5  # timed decode repetitions per context
    warmup: int = 2  # untimed decode repetitions first
    prefill_reps: Optional[int] = None  # timed prefills per context (None: reps; 0: the first fill only)
    threads: int = 0  # 0: every CPU this process may run on
    prefill_chunk: int = 512  # longest prefill call; deeper fills run in chunks of this many tokens
    seed: int = 0  # random-init presets and the random prompt tokens
    work_dir: Optional[Path] = None  # keep exports/artifacts here and reuse them (None: a temporary dir)
    capacities: tuple[int, ...] = ()  # cache slots of the kvc engines and torch-static (empty: `needed_capacity`)
    fill: FillMode = FillMode.SYNTHETIC  # how decode timing reaches its depth
    prefill_contexts: Optional[tuple[int, ...]] = None  # depths whose real prefill is timed (None: all contexts)
    synthetic_tokens: int = 64  # real prefill length whose K/V a synthetic fill tiles
    weights: tuple[WeightDtype, ...] = (WeightDtype.FP32,)  # weight precisions of the kvc engines

    def __post_init__(self) -> None:
        if not self.contexts or min(self.contexts) < 1:
            raise KvcError(f"--contexts must be positive token counts, got {list(self.contexts)}")
        for name in ("gen", "batch", "reps", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise KvcError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.threads < 0 or (self.prefill_reps or 0) < 0:
            raise KvcError("--warmup, --prefill-reps and --threads must not be negative")
        unknown = [d for d in self.kv_dtypes if d not in KV_DTYPES]
        if unknown or not self.kv_dtypes:
            raise KvcError(f"unknown KV-cache dtype(s) {unknown}; choose from {', '.join(KV_DTYPES)}")
        if not self.engines:
            raise KvcError("--engines is empty; choose from " + ", ".join(e.value for e in EngineName))
        if self.synthetic_tokens < 1:
            raise KvcError(f"synthetic_tokens must be at least 1, got {self.synthetic_tokens}")
        small = [c for c in self.capacities if c < self.capacity]
        if small:
            raise KvcError(f"--capacity {small[0]} cannot hold the deepest context plus --gen ({self.capacity} "
                           "tokens); raise it or lower --contexts/--gen")

    @property
    def capacity(self) -> int:
        """Cache slots a run needs: the deepest context plus the timed steps (the default capacity)."""
        return max(self.contexts) + self.gen

    @property
    def resolved_capacities(self) -> tuple[int, ...]:
        return self.capacities or (self.capacity,)

    def times_prefill_at(self, context: int) -> bool:
        return self.prefill_contexts is None or context in self.prefill_contexts

    @property
    def resolved_prefill_reps(self) -> int:
        return self.reps if self.prefill_reps is None else self.prefill_reps

    def resolved_threads(self) -> int:
        return self.threads or available_cpus()


def available_cpus() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def parse_int_list(text: str, option: str) -> tuple[int, ...]:
    """'128,512,2k' -> (128, 512, 2048); a one-line KvcError naming the bad item otherwise."""
    values = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        scale = 1024 if item.lower().endswith("k") else 1
        digits = item[:-1] if scale > 1 else item
        if not digits.isdigit() or int(digits) == 0:
            raise KvcError(f"{option}: {item!r} is not a positive integer; write e.g. {option} 128,512,2048")
        values.append(int(digits) * scale)
    if not values:
        raise KvcError(f"{option} is empty; write e.g. {option} 128,512,2048")
    return tuple(sorted(set(values)))


def parse_choice_list(text: str, choices: tuple[str, ...], option: str) -> tuple[str, ...]:
    items = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in choices]
    if bad or not items:
        raise KvcError(f"{option}: unknown {', '.join(map(repr, bad)) or 'empty list'}; "
                       f"choose from {','.join(choices)}")
    return tuple(dict.fromkeys(items))  # keep order, drop repeats


def parse_engines(text: str) -> tuple[EngineName, ...]:
    text = ",".join(ENGINE_ALIASES.get(t.strip().lower(), t) for t in text.split(","))
    names = parse_choice_list(text, tuple(e.value for e in EngineName), "--engines")
    return tuple(EngineName(n) for n in names)
