"""ONNX Runtime engine: one session over the ring-buffer graph, caches bound in place.

On the CPU every cache tensor is allocated once at load ([max_batch, kv_heads, capacity, head_dim]) and
bound with IO binding as both the graph input ``past_key_values.*`` and the aliased output
``present.*``, so TensorScatter writes the new tokens straight into it: ONNX Runtime's
"in-place optimization not activated, copying past_cache" path is never taken (tests check
the log and the buffer addresses). With ``device="cuda"`` the caches live in device memory instead
(kvc.runtime.ort_device: allocated once, bound by address, decode replayed as CUDA graphs).
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
from kvc.runtime.ort_device import OrtDeviceBinding, OrtPlace, cuda_device_count

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


def providers_for(device: str, cuda_graph: bool = False) -> list:
    """The providers to request. CUDA only where it can start: onnxruntime-gpu lists it on any machine
    and, without a GPU, logs a page of errors before falling back to the CPU."""
    available = ort.get_available_providers()
    if device == "cuda":
        if CUDA_PROVIDER not in available:
            raise ArtifactError("device cuda requested but this onnxruntime has no CUDAExecutionProvider; "
                                "install onnxruntime-gpu or use --device cpu")
        if cuda_device_count() == 0:
            raise ArtifactError("device cuda requested but this machine has no usable CUDA device (no NVIDIA "
                                "driver or GPU); use --device cpu")
        return [(CUDA_PROVIDER, {"device_id": "0", "enable_cuda_graph": "1" if cuda_graph else "0"}),
                "CPUExecutionProvider"]
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
        self.session, cuda_graph = _open_session(root / GRAPH_FILE, so, options.device)
        check_session_device(self.session, options.device)
        self.aliases = {out: inp for inp, out in manifest.cache.io_names()}  # present.* -> past_key_values.*
        self.cache_inputs = manifest.cache.cache_inputs()
        self.device_binding: OrtDeviceBinding | None = None
        if options.device == "cuda":
            self.use_device_binding(OrtPlace("cuda"), cuda_graph)
            return
        # Lowered graphs: bound slots follow the live context (kvc.runtime.live_slots); others: all C.
        self.live_slots = self._has_symbolic_slots()
        self.slots = slots_for(1, self.capacity) if self.live_slots else self.capacity
        self.caches = self._allocate_caches()

    def use_device_binding(self, place: OrtPlace, cuda_graph: bool = False) -> None:
        """Keep the caches in ``place``'s memory at full capacity (what ``device="cuda"`` does; tests
        call it with the "cpu" place to run the same binding without a GPU). Existing contents are dropped."""
        self.live_slots, self.slots, self.caches = False, self.capacity, {}
        providers = [p for p in self.session.get_providers() if p in (CUDA_PROVIDER, "CPUExecutionProvider")]
        self.device_binding = OrtDeviceBinding(self.session, self._cache_types(), self.aliases, self.max_batch,
                                               self.capacity, self.vocab_size, place, providers, cuda_graph)

    def _cache_types(self) -> dict[str, tuple]:
        """cache input -> (numpy storage dtype, ONNX type id), refusing types the engine cannot hold."""
        inputs = {i.name: i for i in self.session.get_inputs()}
        types = {}
        for name in self.cache_inputs:
            if inputs[name].type not in _CACHE_TYPES:
                raise ArtifactError(f"cache input {name} has type {inputs[name].type}, which the ORT engine does "
                                    "not support; recompile with another --kv-dtype")
            types[name] = _CACHE_TYPES[inputs[name].type]
        return types

    def _allocate_caches(self) -> dict[str, np.ndarray]:
        """Zeroed cache buffers of ``self.slots`` slots (zero bytes are 0.0 in every cache dtype)."""
        inputs = {i.name: i for i in self.session.get_inputs()}
        caches = {}
        self._onnx_types = {}
        for name, (storage, onnx_type) in self._cache_types().items():
            meta = inputs[name]
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
        if self.device_binding is not None:
            return self.device_binding.run(input_ids, position_ids, past_len)
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
        if self.device_binding is not None:
            _check_row(row, length, self.max_batch, self.capacity)
            return [self.device_binding.read_row(n, row, length) for n in self.cache_inputs]
        if length > self.slots:
            raise ValueError(f"{length} slots requested, only {self.slots} are bound (nothing was written there)")
        return [self.caches[n][row, :, :length].copy() for n in self.cache_inputs]

    def write_slots(self, row: int, tensors: list[np.ndarray]) -> None:
        if self.device_binding is not None:
            _check_row(row, max(t.shape[1] for t in tensors), self.max_batch, self.capacity)
            for name, t in zip(self.cache_inputs, tensors):
                self.device_binding.write_row(name, row, t)
            return
        self._fit_slots(max(t.shape[1] for t in tensors))
        for name, t in zip(self.cache_inputs, tensors):
            self.caches[name][row, :, : t.shape[1]] = t

    def cache_nbytes(self) -> int:
        """Bytes of all cache rows at the full capacity (the most the engine binds)."""
        if self.device_binding is not None:
            return self.device_binding.nbytes()
        return sum(c.nbytes // c.shape[2] * self.capacity for c in self.caches.values())


def _open_session(graph: Path, so: ort.SessionOptions, device: str) -> tuple[ort.InferenceSession, bool]:
    """The session, and whether it captures CUDA graphs. ONNX Runtime refuses graph capture at creation
    when a node of the graph is not on the CUDA EP; the session is then made without it."""
    if device != "cuda":
        return ort.InferenceSession(str(graph), so, providers=providers_for(device)), False
    try:
        return ort.InferenceSession(str(graph), so, providers=providers_for(device, cuda_graph=True)), True
    except (RuntimeError, ort.capi.onnxruntime_pybind11_state.Fail):  # partitioned across EPs: no graphs
        return ort.InferenceSession(str(graph), so, providers=providers_for(device)), False


def _check_row(row: int, length: int, max_batch: int, capacity: int) -> None:
    if not 0 <= row < max_batch or not 0 <= length <= capacity:
        raise ValueError(f"row {row} / {length} slots outside the cache ({max_batch} x {capacity})")
