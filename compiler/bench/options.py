"""Typed settings of `kvc bench` and the parsing of its comma-separated lists."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from kvc.errors import KvcError

KV_DTYPES = ("fp32", "fp16", "bf16", "int8", "fp8")
BASELINE_KV_DTYPE = "fp32"  # the concat export (torch, ort-concat) always holds its past in fp32


class EngineName(str, enum.Enum):
    KVC_ORT = "kvc-ort"  # kvc artifact, ONNX Runtime engine (ring buffer, in-place IO binding)
    KVC_TVM = "kvc-tvm"  # kvc artifact, TVM engine
    ORT_CONCAT = "ort-concat"  # ONNX Runtime on the plain concat export: past fed back and copied each step
    TORCH = "torch"  # PyTorch eager on kvc's own model, concat KV, torch.no_grad

    @property
    def is_kvc(self) -> bool:
        return self in (EngineName.KVC_ORT, EngineName.KVC_TVM)

    @property
    def compile_engine(self) -> str:
        """The `kvc compile --engine` value of a kvc engine."""
        return {EngineName.KVC_ORT: "ort", EngineName.KVC_TVM: "tvm"}[self]


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

    @property
    def capacity(self) -> int:
        """Cache slots the kvc engines are compiled with: the deepest context plus the timed steps."""
        return max(self.contexts) + self.gen

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
    names = parse_choice_list(text, tuple(e.value for e in EngineName), "--engines")
    return tuple(EngineName(n) for n in names)
