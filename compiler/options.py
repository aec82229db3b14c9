"""Typed options of `kvc compile` (what the user asked for; what the model is comes from
kvc.compiler.model_description)."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from kvc.contract import EngineKind, KvDtype, WeightDtype, parse_kv_dtype, parse_weight_dtype
from kvc.errors import KvcError


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
    kv_dtype: KvDtype = KvDtype.FP32  # text (the CLI's --kv-dtype) is parsed on construction
    kv_scales: Optional[Path] = None  # static FP8 scales from `kvc calibrate`
    sliding_window: Optional[int] = None  # override the model's window (None: from the model config)
    dump_passes: Optional[Path] = None
    verify: bool = False
    check: bool = True  # run the original graph and the compiled engine on one prompt before writing (--no-check)
    tune_trials: int = 0
    tuning_db: Optional[Path] = None
    config_path: Optional[Path] = None  # HF config.json for graphs without kvc metadata
    cpu: str = NATIVE_CPU  # TVM llvm only: "native" (this machine's CPU), "generic" (portable) or an LLVM CPU name
    weights: WeightDtype = WeightDtype.FP32  # weight storage (--weights)
    weight_block: int = 32  # int8/int4: values per scale along the input dim (--weight-block)
    weight_symmetric: bool = True  # int8/int4: False stores a zero point per block (--weight-scheme)

    def __post_init__(self) -> None:
        if not isinstance(self.kv_dtype, KvDtype):
            object.__setattr__(self, "kv_dtype", parse_kv_dtype(self.kv_dtype))
        if not isinstance(self.weights, WeightDtype):
            object.__setattr__(self, "weights", parse_weight_dtype(self.weights))
        if not isinstance(self.engine, EngineKind):
            object.__setattr__(self, "engine", EngineKind(self.engine))

    @property
    def weight_quant(self):
        """The weight pass's options (validates the block size)."""
        from kvc.passes.weight_quantize import WeightQuantOptions

        return WeightQuantOptions(self.weights, self.weight_block, self.weight_symmetric)

    def capacity_for(self, max_position_embeddings: int) -> int:
        """The ring's capacity. Above the model's positions it could never fill: positions stop at
        max_position_embeddings (learned tables end there, RoPE was not trained past it), so it is refused."""
        if self.max_seq_len is None:
            return min(max_position_embeddings, 2048)
        if self.max_seq_len > max_position_embeddings:
            raise KvcError(f"--max-seq-len {self.max_seq_len} exceeds the model's {max_position_embeddings} "
                           f"positions (max_position_embeddings); use --max-seq-len {max_position_embeddings} "
                           "or less")
        return self.max_seq_len
