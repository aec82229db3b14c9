"""Typed options of `kvc compile`."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


class EngineKind(str, enum.Enum):
    ORT = "ort"  # ONNX Runtime: optimized graph + in-place IO binding
    TVM = "tvm"  # Apache TVM: Relax + own TIR kernels -> lib/<target>.so


class Device(str, enum.Enum):
    CPU = "cpu"  # TVM: llvm
    CUDA = "cuda"


NATIVE_CPU = "native"  # LLVM's name for the compiling machine's CPU (AVX2/AVX-512 when it has them)
GENERIC_CPU = "generic"  # baseline x86-64: runs anywhere, about half the decode speed


@dataclass(frozen=True)
class CompileOptions:
    engine: EngineKind = EngineKind.ORT
    device: Device = Device.CPU
    max_seq_len: Optional[int] = None  # ring capacity; None: min(model max positions, 2048)
    kv_dtype: str = "fp32"  # parsed into passes.kv_layout.KvDtype by the pipeline
    kv_scales: Optional[Path] = None  # static FP8 scales from `kvc calibrate`
    sliding_window: Optional[int] = None  # override the model's window (None: from the model config)
    dump_passes: Optional[Path] = None
    verify: bool = False
    tune_trials: int = 0
    tuning_db: Optional[Path] = None
    config_path: Optional[Path] = None  # HF config.json for graphs without kvc metadata
    cpu: str = NATIVE_CPU  # TVM llvm only: "native" (this machine's CPU), "generic" (portable) or an LLVM CPU name

    def capacity_for(self, max_position_embeddings: int) -> int:
        return self.max_seq_len if self.max_seq_len is not None else min(max_position_embeddings, 2048)
