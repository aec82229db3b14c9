"""TVM engine: the artifact's lib/<target>.so in the Relax VM, caches allocated once and passed
to `prefill` / `decode`, which update them in place (call_tir_inplace) and return them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvc.errors import ArtifactError
from kvc.runtime.artifact import Manifest
from kvc.runtime.engine import check_step_inputs

_STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "int8": np.int8,
            "float8_e4m3fn": np.uint8}


# Instruction-set extensions (LLVM feature names); other features of a CPU model are tuning hints.
_ISA_PREFIXES = ("sse", "ssse", "avx", "fma", "f16c", "bmi", "amx", "vaes", "vpclmulqdq", "gfni", "popcnt",
                 "lzcnt", "movbe", "sha")


def _check_cpu_features(built_for: str) -> None:
    """Refuse a library built for a CPU whose vector instructions this one lacks (it would crash
    with an illegal instruction), before it is loaded."""
    import tvm
    from tvm.target import codegen

    def isa(cpu: str) -> set[str]:
        features = codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": cpu}))
        return {str(f) for f in features if str(f).startswith(_ISA_PREFIXES)}

    here = codegen.llvm_get_system_cpu()
    missing = sorted(isa(built_for) - isa(here))
    if missing:
        raise ArtifactError(f"artifact was compiled for CPU {built_for}; this CPU ({here}) lacks "
                            f"{', '.join(missing)}; recompile here, or with --cpu generic for any x86-64")


SINGLE_ROW_DECODE = "decode_b1"  # kvc.compiler.tvm_build.SINGLE_ROW_DECODE


@dataclass(frozen=True)
class TvmEngineOptions:
    device: str = "cpu"
    max_batch: int = 1
    threads: int = 0  # CPU: 0 = one per core this process may use


# TVM's runtime.config_threadpool mode: workers float over the given cores (no pinning).
_SHARE_ALL_CORES = -3


def _configure_threads(threads: int) -> None:
    """TVM's pool defaults to half the logical CPUs (it assumes two hyperthreads per core), i.e.
    one thread on a 2-vCPU machine; size it like ONNX Runtime does: one thread per usable core.
    The pool is process-wide."""
    import os

    import tvm

    cores = sorted(os.sched_getaffinity(0))
    count = threads or len(cores)
    tvm.get_global_func("runtime.config_threadpool")(_SHARE_ALL_CORES, count, [str(c) for c in cores])


class TvmEngine:
    def __init__(self, root: Path, manifest: Manifest, options: TvmEngineOptions = TvmEngineOptions()):
        import tvm
        from safetensors.numpy import load_file
        from tvm import relax

        self.capacity = manifest.cache.capacity
        self.max_batch = options.max_batch
        self.vocab_size = int(manifest.model["vocab_size"])
        eo = manifest.engine_options
        if options.device == "cuda" and eo["target"] != "cuda" or options.device == "cpu" and eo["target"] != "llvm":
            raise ArtifactError(f"artifact was compiled for {eo['target']}, not {options.device}; "
                                "recompile with the matching --target")
        if eo.get("llvm_cpu"):
            _check_cpu_features(eo["llvm_cpu"])
        self.device = tvm.cuda(0) if options.device == "cuda" else tvm.cpu(0)
        if options.device == "cpu":
            _configure_threads(options.threads)
        self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(root / eo["lib"])), self.device)
        weights = {name: tvm.runtime.tensor(value, self.device)
                   for name, value in load_file(str(root / eo["params"])).items()}  # one copy, shared
        self.entry_params = {entry: [weights[n] for n in names] for entry, names in eo["entry_params"].items()}
        self.cache_inputs = list(eo["cache_inputs"])
        shapes = manifest.entry_points[0].inputs
        self.caches = {}
        for name in self.cache_inputs:
            shape = [self.max_batch] + [int(d) for d in shapes[name][1:]]
            self.caches[name] = tvm.runtime.empty(shape, self._cache_dtype(name, manifest), self.device)
            self.caches[name].copyfrom(np.zeros(shape, dtype=_STORAGE[self.caches[name].dtype]).view(
                _STORAGE[self.caches[name].dtype]))
        self._tvm = tvm

    @staticmethod
    def _cache_dtype(name: str, manifest: Manifest) -> str:
        if name.endswith("_scale"):
            return "float32"
        return {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "int8",
                "fp8": "float8_e4m3fn"}[manifest.cache.dtype]

    def _views(self, batch: int) -> list:
        if batch == self.max_batch:
            return [self.caches[n] for n in self.cache_inputs]
        return [self.caches[n]._create_view([batch, *self.caches[n].shape[1:]]) for n in self.cache_inputs]

    def forward(self, input_ids: np.ndarray, position_ids: np.ndarray, past_len: np.ndarray) -> np.ndarray:
        check_step_inputs(self, input_ids, position_ids, past_len)
        tensor = self._tvm.runtime.tensor
        entry = "decode" if input_ids.shape[1] == 1 else "prefill"
        if entry == "decode" and input_ids.shape[0] == 1 and SINGLE_ROW_DECODE in self.entry_params:
            entry = SINGLE_ROW_DECODE  # all shapes static: the tunable, leaner step
        caches = self._views(input_ids.shape[0])
        out = self.vm[entry](tensor(np.ascontiguousarray(input_ids, np.int64), self.device),
                             tensor(np.ascontiguousarray(position_ids, np.int64), self.device),
                             tensor(np.ascontiguousarray(past_len, np.int64), self.device),
                             *caches, *self.entry_params[entry])
        for returned, cache in zip(list(out)[1:], caches):
            if returned.data_ptr() != cache.data_ptr():
                raise RuntimeError("TVM engine returned a new cache buffer: the in-place update was lost")
        return out[0].numpy()

    def _host(self, name: str) -> np.ndarray:
        return self.caches[name].numpy()

    def read_slots(self, row: int, length: int) -> list[np.ndarray]:
        return [self._host(n)[row, :, :length].copy() for n in self.cache_inputs]

    def write_slots(self, row: int, tensors: list[np.ndarray]) -> None:
        for name, t in zip(self.cache_inputs, tensors):
            host = self._host(name)
            host[row, :, : t.shape[1]] = t
            self.caches[name].copyfrom(host)

    def cache_nbytes(self) -> int:
        return sum(int(np.prod(c.shape)) * np.dtype(_STORAGE[c.dtype]).itemsize for c in self.caches.values())
