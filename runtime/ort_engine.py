"""ONNX Runtime engine: one session over the ring-buffer graph, caches bound in place.

Every cache tensor is allocated once at load ([max_batch, kv_heads, capacity, head_dim]) and
bound with IO binding as both the graph input ``past_key_values.*`` and the aliased output
``present.*``, so TensorScatter writes the new tokens straight into it: ONNX Runtime's
"in-place optimization not activated, copying past_cache" path is never taken (tests check
the log and the buffer addresses).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto

from kvc.contract import GRAPH_FILE
from kvc.errors import ArtifactError
from kvc.runtime.artifact import Manifest
from kvc.runtime.engine import check_step_inputs
from kvc.runtime.live_slots import slots_for

# ONNX element type (as ORT names it) -> (numpy storage dtype of the host buffer, ONNX type id).
# bfloat16 and float8 have no numpy dtype: their bytes live in uint16/uint8 buffers that ORT reads
# with the right type (ortvalue_from_numpy_with_onnx_type shares the memory, no copy).
_CACHE_TYPES = {"tensor(float)": (np.float32, TensorProto.FLOAT),
                "tensor(float16)": (np.float16, TensorProto.FLOAT16),
                "tensor(bfloat16)": (np.uint16, TensorProto.BFLOAT16),
                "tensor(int8)": (np.int8, TensorProto.INT8),
                "tensor(float8e4m3fn)": (np.uint8, TensorProto.FLOAT8E4M3FN)}


@dataclass(frozen=True)
class OrtEngineOptions:
    device: str = "cpu"  # "cpu" | "cuda"
    max_batch: int = 1
    intra_op_threads: int = 0  # 0: ONNX Runtime's default (all cores)
    log_severity: int = 3  # 0 verbose .. 4 fatal; tests lower it to inspect ORT's in-place messages


CUDA_PROVIDER = "CUDAExecutionProvider"


def providers_for(device: str) -> list[str]:
    available = ort.get_available_providers()
    if device == "cuda":
        if CUDA_PROVIDER not in available:
            raise ArtifactError("device cuda requested but this onnxruntime has no CUDAExecutionProvider; "
                                "install onnxruntime-gpu or use --device cpu")
        return [CUDA_PROVIDER, "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def check_session_device(session: ort.InferenceSession, device: str) -> None:
    """onnxruntime-gpu lists CUDAExecutionProvider even without a usable GPU and then silently falls
    back to CPU: refuse unless the session really got the CUDA provider."""
    if device == "cuda" and CUDA_PROVIDER not in session.get_providers():
        raise ArtifactError("device cuda requested but ONNX Runtime could not start its CUDA provider (no usable "
                            "GPU or CUDA libraries); use --device cpu or fix the CUDA installation")


class OrtEngine:
    def __init__(self, root: Path, manifest: Manifest, options: OrtEngineOptions = OrtEngineOptions()):
        self.options = options
        self.capacity = manifest.cache.capacity
        self.max_batch = options.max_batch
        self.vocab_size = manifest.limits.vocab_size
        self.max_positions = manifest.limits.max_positions
        so = ort.SessionOptions()
        so.log_severity_level = options.log_severity
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if options.intra_op_threads:
            so.intra_op_num_threads = options.intra_op_threads
        # the fixed name, listed and hashed (validate_artifact), never a manifest path
        self.session = ort.InferenceSession(str(root / GRAPH_FILE), so, providers=providers_for(options.device))
        check_session_device(self.session, options.device)
        self.aliases = {out: inp for inp, out in manifest.cache.io_names()}  # present.* -> past_key_values.*
        self.cache_inputs = manifest.cache.cache_inputs()
        # Lowered graphs: bound slots follow the live context (kvc.runtime.live_slots); others: all C.
        self.live_slots = self._has_symbolic_slots()
        self.slots = slots_for(1, self.capacity) if self.live_slots else self.capacity
        self.caches = self._allocate_caches()

    def _allocate_caches(self) -> dict[str, np.ndarray]:
        """Zeroed cache buffers of ``self.slots`` slots (zero bytes are 0.0 in every cache dtype)."""
        inputs = {i.name: i for i in self.session.get_inputs()}
        caches = {}
        self._onnx_types = {}
        for name in self.cache_inputs:
            meta = inputs[name]
            if meta.type not in _CACHE_TYPES:
                raise ArtifactError(f"cache input {name} has type {meta.type}, which the ORT engine does not "
                                    "support; recompile with another --kv-dtype")
            storage, onnx_type = _CACHE_TYPES[meta.type]
            caches[name] = np.zeros([self.max_batch, int(meta.shape[1]), self.slots, int(meta.shape[3])], storage)
            self._onnx_types[name] = onnx_type
        return caches

    def _has_symbolic_slots(self) -> bool:
        """True for graphs lowered by lower_ort_live_slots; others have the capacity as a static dim."""
        inputs = {i.name: i for i in self.session.get_inputs()}
        return all(not isinstance(inputs[n].shape[2], int) for n in self.cache_inputs)

    def _resize(self, slots: int) -> None:
        """Rebind the caches with ``slots`` slots, keeping every row's first min(old, new) slots."""
        keep = min(slots, self.slots)
        old, self.slots = self.caches, slots
        self.caches = {name: np.zeros(a.shape[:2] + (slots,) + a.shape[3:], a.dtype) for name, a in old.items()}
        for name, array in self.caches.items():
            array[:, :, :keep] = old[name][:, :, :keep]

    def _fit_slots(self, needed: int) -> None:
        """Grow the bound slots to what ``needed`` tokens per row take; never shrink here, because rows
        outside the current call (a server's other requests) may hold more."""
        if self.live_slots and slots_for(needed, self.capacity) > self.slots:
            self._resize(slots_for(needed, self.capacity))

    def release_slots(self) -> None:
        """Every row is about to be rewritten from slot 0 (a new generation): shrink the bound slots back
        to the minimum, so a short request after a long one pays for its own context only."""
        if self.live_slots and self.slots > slots_for(1, self.capacity):
            self._resize(slots_for(1, self.capacity))

    def forward(self, input_ids: np.ndarray, position_ids: np.ndarray, past_len: np.ndarray) -> np.ndarray:
        check_step_inputs(self, input_ids, position_ids, past_len)
        batch = input_ids.shape[0]
        self._fit_slots(int(past_len.max()) + input_ids.shape[1])
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        binding.bind_cpu_input("past_len", np.ascontiguousarray(past_len, dtype=np.int64))
        binding.bind_output("logits")  # first output bound -> get_outputs()[0]
        for out_name, in_name in self.aliases.items():
            # rows [:batch] of a C-contiguous buffer are contiguous: the OrtValue shares its memory.
            value = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(self.caches[in_name][:batch],
                                                                    self._onnx_types[in_name])
            binding.bind_ortvalue_input(in_name, value)
            binding.bind_ortvalue_output(out_name, value)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def read_slots(self, row: int, length: int) -> list[np.ndarray]:
        if length > self.slots:
            raise ValueError(f"{length} slots requested, only {self.slots} are bound (nothing was written there)")
        return [self.caches[n][row, :, :length].copy() for n in self.cache_inputs]

    def write_slots(self, row: int, tensors: list[np.ndarray]) -> None:
        self._fit_slots(max(t.shape[1] for t in tensors))
        for name, t in zip(self.cache_inputs, tensors):
            self.caches[name][row, :, : t.shape[1]] = t

    def cache_nbytes(self) -> int:
        """Bytes of all cache rows at the full capacity (the most the engine binds)."""
        return sum(c.nbytes // c.shape[2] * self.capacity for c in self.caches.values())
