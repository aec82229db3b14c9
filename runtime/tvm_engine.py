"""TVM engine: the artifact's lib/<target>.so in the Relax VM, caches allocated once and passed
to `prefill` / `decode`, which update them in place (call_tir_inplace) and return them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvc.contract import PARAMS_FILE, Entry, lib_file
from kvc.errors import ArtifactError, KvcError
from kvc.runtime.artifact import Manifest, TvmOptions
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


SINGLE_ROW_DECODE = Entry.DECODE_B1.value


@dataclass(frozen=True)
class TvmEngineOptions:
    device: str = "cpu"
    max_batch: int = 1
    threads: int = 0  # CPU: 0 = one per core this process may use


# TVM's runtime.config_threadpool mode: workers float over the given cores (no pinning).
_SHARE_ALL_CORES = -3
_pool_threads: int | None = None  # TVM's pool is process-wide: sized once, by the first CPU load


def configure_threads(threads: int) -> None:
    """TVM's pool defaults to half the logical CPUs (it assumes two hyperthreads per core), i.e.
    one thread on a 2-vCPU machine; size it like ONNX Runtime does: one thread per usable core.
    The pool is process-wide, so it is configured once; a later load asking another count is refused
    (reconfiguring would resize the pool under models already loaded)."""
    global _pool_threads
    import os

    import tvm

    cores = sorted(os.sched_getaffinity(0))
    count = threads or len(cores)
    if _pool_threads is not None:
        if threads and count != _pool_threads:
            raise KvcError(f"TVM's thread pool is process-wide and already runs {_pool_threads} threads; "
                           f"load every TVM model of this process with threads={_pool_threads} (or 0)")
        return
    tvm.get_global_func("runtime.config_threadpool")(_SHARE_ALL_CORES, count, [str(c) for c in cores])
    _pool_threads = count


def _check_device(device: str, target: str) -> None:
    """Refuse a device the library cannot run on, before the library is loaded."""
    import tvm

    wanted = {"cpu": "llvm", "cuda": "cuda"}.get(device)
    if wanted != target:
        raise ArtifactError(f"artifact was compiled for {target}, not {device}; recompile with the matching --target")
    if device == "cuda" and not tvm.cuda(0).exist:
        raise ArtifactError("device cuda requested but TVM finds no CUDA GPU; use --device cpu with a CPU build")


class TvmEngine:
    def __init__(self, root: Path, manifest: Manifest, options: TvmEngineOptions = TvmEngineOptions()):
        import tvm
        from safetensors.numpy import load_file
        from tvm import relax

        self.capacity = manifest.cache.capacity
        self.max_batch = options.max_batch
        self.vocab_size = manifest.limits.vocab_size
        self.max_positions = manifest.limits.max_positions
        eo = manifest.engine_options
        assert isinstance(eo, TvmOptions)  # validate_artifact typed it
        _check_device(options.device, eo.target)
        if eo.llvm_cpu:
            _check_cpu_features(eo.llvm_cpu)
        self.device = tvm.cuda(0) if options.device == "cuda" else tvm.cpu(0)
        if options.device == "cpu":
            configure_threads(options.threads)
        # fixed names, listed and hashed by validate_artifact (eo.lib was checked to equal lib_file(target))
        self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(root / lib_file(eo.target))), self.device)
        weights = {name: tvm.runtime.tensor(value, self.device)
                   for name, value in load_file(str(root / PARAMS_FILE)).items()}  # one copy, shared
        self.entry_params = {entry: [weights[n] for n in names] for entry, names in eo.entry_params.items()}
        self.cache_inputs = manifest.cache.cache_inputs()
        self.caches = {}
        for name in self.cache_inputs:
            shape = manifest.cache.tensor_shape(name, self.max_batch)
            dtype = manifest.cache.storage(name)
            self.caches[name] = tvm.runtime.empty(shape, dtype, self.device)
            self.caches[name].copyfrom(np.zeros(shape, dtype=_STORAGE[dtype]))
        self._tvm = tvm

    def _views(self, batch: int) -> list:
        if batch == self.max_batch:
            return [self.caches[n] for n in self.cache_inputs]
        return [self.caches[n]._create_view([batch, *self.caches[n].shape[1:]]) for n in self.cache_inputs]

    def forward(self, input_ids: np.ndarray, position_ids: np.ndarray, past_len: np.ndarray) -> np.ndarray:
        check_step_inputs(self, input_ids, position_ids, past_len)
        tensor = self._tvm.runtime.tensor
        entry = Entry.DECODE.value if input_ids.shape[1] == 1 else Entry.PREFILL.value
        if entry == Entry.DECODE.value and input_ids.shape[0] == 1 and SINGLE_ROW_DECODE in self.entry_params:
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

    def _row(self, name: str, row: int):
        """A view of one cache row (rows are contiguous in [B, H, C, D]): only its bytes are copied."""
        cache = self.caches[name]
        return cache._create_view(list(cache.shape[1:]), relative_byte_offset=row * self._row_bytes(cache))

    @staticmethod
    def _row_bytes(cache) -> int:
        return int(np.prod(cache.shape[1:])) * np.dtype(_STORAGE[cache.dtype]).itemsize

    def read_slots(self, row: int, length: int) -> list[np.ndarray]:
        if not 0 <= row < self.max_batch or not 0 <= length <= self.capacity:
            raise ValueError(f"row {row} / {length} slots outside the cache ({self.max_batch} x {self.capacity})")
        return [self._row(n, row).numpy()[:, :length].copy() for n in self.cache_inputs]

    def write_slots(self, row: int, tensors: list[np.ndarray]) -> None:
        if not 0 <= row < self.max_batch:
            raise ValueError(f"row {row} outside the cache's {self.max_batch} rows")
        for name, t in zip(self.cache_inputs, tensors):
            view = self._row(name, row)
            host = view.numpy()  # this row only
            host[:, : t.shape[1]] = t
            view.copyfrom(host)

    def release_slots(self) -> None:
        """Nothing to release: the TVM kernels already read only the live slots of full-capacity buffers."""

    def cache_nbytes(self) -> int:
        return sum(int(np.prod(c.shape)) * np.dtype(_STORAGE[c.dtype]).itemsize for c in self.caches.values())
