"""The ORT engine's device-resident path (``--device cuda``): caches live in device memory, allocated once.

Every cache tensor is one device buffer [max_batch, kv_heads, capacity, head_dim] for the engine's
lifetime, bound by address with IO binding as both ``past_key_values.*`` and its aliased
``present.*`` (TensorScatter writes in place on the device; a call of b rows binds the first b rows,
which are contiguous, by the same address). Nothing of the cache crosses to the host per step: the
inputs are a few int64 per row and only the logits come back.

The live-slot resizing of the host path (kvc.runtime.live_slots) is not done here: a resize would
reallocate and copy device buffers, and CUDA graphs need fixed addresses. The device binds the full
capacity; attention still skips slots past ``past_len`` through nonpad_kv_seqlen.

CUDA graphs: decode (one token per row) is captured once per batch size and replayed (ONNX Runtime's
``enable_cuda_graph`` with a ``gpu_graph_id`` per batch size); its inputs and logits then live in
fixed device buffers, updated in place. ONNX Runtime refuses graph capture at session creation when
some node of the graph is not on the CUDA EP; the engine then runs without graphs
(``OrtDeviceBinding.cuda_graph`` says which).

The binding is written against an ``OrtPlace`` ("cuda", or "cpu" so that tests run the same address
binding and row copies on a machine without a GPU).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from kvc.contract import INPUT_IDS, LOGITS, PAST_LEN, POSITION_IDS

GRAPH_ID_OPTION = "gpu_graph_id"  # ONNX Runtime's run option selecting a captured CUDA graph
NO_GRAPH = "-1"  # that option's value for a run that is neither captured nor replayed
_STEP_INPUTS = (INPUT_IDS, POSITION_IDS, PAST_LEN)


@dataclass(frozen=True)
class OrtPlace:
    """Where device buffers live, as ONNX Runtime names devices."""

    kind: str = "cuda"  # "cuda" | "cpu"
    index: int = 0


def cuda_device_count() -> int:
    """NVIDIA GPUs the driver reports (0 without a driver): asked before ONNX Runtime's CUDA provider
    is requested, which otherwise logs a page of errors on a machine without a GPU."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


@dataclass(frozen=True)
class CacheBuffer:
    value: ort.OrtValue  # the whole [max_batch, K, C, D] buffer
    onnx_type: int
    row_shape: tuple  # [K, C, D]
    row_bytes: int
    storage: type  # numpy dtype of a host copy (uint16 for bfloat16, uint8 for float8)

    def address(self, row: int = 0) -> int:
        return self.value.data_ptr() + row * self.row_bytes


class RowCopier:
    """Copies one cache row between device and host, only that row's bytes: a one-node Identity
    session over uint8 bound by address (the Python API copies whole OrtValues only)."""

    def __init__(self, place: OrtPlace, providers: list):
        node = helper.make_node("Identity", ["x"], ["y"])
        graph = helper.make_graph([node], "row_copy", [helper.make_tensor_value_info("x", TensorProto.UINT8, ["n"])],
                                  [helper.make_tensor_value_info("y", TensorProto.UINT8, ["n"])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
        model.ir_version = 10
        so = ort.SessionOptions()
        so.log_severity_level = 3
        self.session = ort.InferenceSession(model.SerializeToString(), so, providers=providers)
        self.place = place

    def to_host(self, buffer: CacheBuffer, row: int) -> np.ndarray:
        binding = self.session.io_binding()
        binding.bind_input("x", self.place.kind, self.place.index, TensorProto.UINT8, [buffer.row_bytes],
                           buffer.address(row))
        binding.bind_output("y", "cpu")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0].view(buffer.storage).reshape(buffer.row_shape)

    def to_device(self, buffer: CacheBuffer, row: int, host_row: np.ndarray) -> None:
        data = np.ascontiguousarray(host_row, buffer.storage).reshape(-1).view(np.uint8)
        binding = self.session.io_binding()
        binding.bind_cpu_input("x", data)
        binding.bind_output("y", self.place.kind, self.place.index, TensorProto.UINT8, [buffer.row_bytes],
                            buffer.address(row))
        self.session.run_with_iobinding(binding)


@dataclass
class DecodeBuffers:
    """Fixed device buffers of one batch size's decode step (what a captured CUDA graph reads/writes)."""

    inputs: dict  # name -> OrtValue [b, 1] / [b]
    logits: ort.OrtValue  # [b, 1, vocab]


class OrtDeviceBinding:
    """Device-resident caches and the binding of one step to them."""

    def __init__(self, session: ort.InferenceSession, cache_types: dict, aliases: dict[str, str],
                 max_batch: int, capacity: int, vocab_size: int, place: OrtPlace, providers: list,
                 cuda_graph: bool):
        self.session, self.place, self.cuda_graph, self.vocab_size = session, place, cuda_graph, vocab_size
        self.aliases = aliases  # present.* -> past_key_values.*
        inputs = {i.name: i for i in session.get_inputs()}
        self.buffers: dict[str, CacheBuffer] = {}
        for name, (storage, onnx_type) in cache_types.items():
            meta = inputs[name]
            row_shape = (int(meta.shape[1]), capacity, int(meta.shape[3]))
            value = ort.OrtValue.ortvalue_from_shape_and_type([max_batch, *row_shape], onnx_type, place.kind,
                                                              place.index)
            value.update_inplace(np.zeros([max_batch, *row_shape], storage))  # 0 bytes: 0.0 in every cache dtype
            self.buffers[name] = CacheBuffer(value, onnx_type, row_shape,
                                             int(np.prod(row_shape)) * np.dtype(storage).itemsize, storage)
        outputs = {o.name: o for o in session.get_outputs()}
        self.logits_type = _numpy_for(outputs[LOGITS].type)
        self.copier = RowCopier(place, providers)
        self._decode: dict[int, DecodeBuffers] = {}

    def run(self, input_ids: np.ndarray, position_ids: np.ndarray, past_len: np.ndarray) -> np.ndarray:
        """One step; the logits on the host. Decode steps replay a CUDA graph when there is one."""
        batch = input_ids.shape[0]
        binding = self.session.io_binding()
        host = dict(zip(_STEP_INPUTS, (input_ids, position_ids, past_len)))
        run_options = ort.RunOptions()
        if self.cuda_graph and input_ids.shape[1] == 1:
            fixed = self._decode_buffers(batch)
            for name, array in host.items():
                fixed.inputs[name].update_inplace(np.ascontiguousarray(array, np.int64))
                binding.bind_ortvalue_input(name, fixed.inputs[name])
            binding.bind_ortvalue_output(LOGITS, fixed.logits)
            self._bind_caches(binding, batch)
            run_options.add_run_config_entry(GRAPH_ID_OPTION, str(batch))  # one graph per batch size
            self.session.run_with_iobinding(binding, run_options)
            return fixed.logits.numpy().copy()  # on the "cpu" place numpy() shares the fixed buffer
        for name, array in host.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array, np.int64))
        binding.bind_output(LOGITS, self.place.kind, self.place.index)  # first output bound: outputs()[0]
        self._bind_caches(binding, batch)
        if self.cuda_graph:
            run_options.add_run_config_entry(GRAPH_ID_OPTION, NO_GRAPH)
        self.session.run_with_iobinding(binding, run_options)
        return binding.get_outputs()[0].numpy()  # the logits only (copy_outputs_to_cpu would copy the caches too)

    def _bind_caches(self, binding, batch: int) -> None:
        for out_name, in_name in self.aliases.items():
            buffer = self.buffers[in_name]
            shape = [batch, *buffer.row_shape]
            binding.bind_input(in_name, self.place.kind, self.place.index, buffer.onnx_type, shape, buffer.address())
            binding.bind_output(out_name, self.place.kind, self.place.index, buffer.onnx_type, shape,
                                buffer.address())

    def _decode_buffers(self, batch: int) -> DecodeBuffers:
        if batch not in self._decode:
            kind, index = self.place.kind, self.place.index
            inputs = {name: ort.OrtValue.ortvalue_from_shape_and_type([batch] if name == PAST_LEN else [batch, 1],
                                                                      np.int64, kind, index)
                      for name in _STEP_INPUTS}
            logits = ort.OrtValue.ortvalue_from_shape_and_type([batch, 1, self.vocab_size], self.logits_type, kind,
                                                               index)
            self._decode[batch] = DecodeBuffers(inputs, logits)
        return self._decode[batch]

    def read_row(self, name: str, row: int, length: int) -> np.ndarray:
        return self.copier.to_host(self.buffers[name], row)[:, :length].copy()

    def write_row(self, name: str, row: int, tensor: np.ndarray) -> None:
        host = self.copier.to_host(self.buffers[name], row)
        host[:, : tensor.shape[1]] = tensor
        self.copier.to_device(self.buffers[name], row, host)

    def nbytes(self) -> int:
        return sum(b.row_bytes * b.value.shape()[0] for b in self.buffers.values())


def _numpy_for(ort_type: str):
    """The logits' numpy dtype (kvc graphs return float32, or float16 when computing in half)."""
    return {"tensor(float)": np.float32, "tensor(float16)": np.float16}[ort_type]
