"""Helpers for the TVM engine tests (a plain module: test modules cannot import conftest)."""
from __future__ import annotations

import importlib
import tempfile
import warnings

import numpy as np
import onnx
from onnx import numpy_helper

# onnx's backend-test case modules for the ops kvc lowers itself; importing one generates its cases
# (the .pb case directories are not shipped in the onnx wheel).
CASE_MODULES = ("attention", "rotaryembedding", "rmsnormalization", "tensorscatter", "quantizelinear",
                "dequantizelinear", "cast")


def load_node_cases() -> dict:
    """name -> onnx.backend.test.case.test_case.TestCase for every case of CASE_MODULES."""
    import onnx.backend.test.case.node as node_cases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the cast cases warn about overflows they test on purpose
        for module in CASE_MODULES:
            importlib.import_module(f"onnx.backend.test.case.node.{module}")
    return {case.name: case for case in node_cases._NodeTestCases}


def as_numpy(value) -> np.ndarray:
    """A case's input/output (float8 ones come as TensorProto) as a numpy array."""
    return numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else np.asarray(value)


def load_vm(executable, device=None):
    """A relax VM for a built module, via an exported shared library: for small graphs that loads
    several times faster than the in-process LLVM JIT (which optimizes fully whatever the opt-level)."""
    import tvm
    from tvm import relax

    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/module.so"
        executable.export_library(path)
        return relax.VirtualMachine(tvm.runtime.load_module(path), device or tvm.cpu())


def call_vm(vm, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Run ``main``; outputs as a list of numpy arrays."""
    import tvm

    result = vm["main"](*[tvm.runtime.tensor(a if a.flags.c_contiguous else a.copy()) for a in inputs])
    if isinstance(result, tvm.runtime.Tensor):
        return [result.numpy()]
    return [r.numpy() for r in result]


def run_vm(executable, inputs: list[np.ndarray]) -> list[np.ndarray]:
    return call_vm(load_vm(executable), inputs)


class OrtRunner:
    """ONNX Runtime CPU on a model, float8 / bfloat16 tensors passed as raw bits (ORT's numpy bridge
    has no such dtypes) and returned as ml_dtypes arrays."""

    def __init__(self, model: onnx.ModelProto):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.output_types = [o.type.tensor_type.elem_type for o in model.graph.output]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import onnxruntime as ort

        values = {name: ort.OrtValue.ortvalue_from_numpy_with_onnx_type(*_ort_bits(array))
                  for name, array in feeds.items()}
        outputs = self.session.run_with_ort_values(None, values)
        return [_from_bits(value.numpy(), elem) for value, elem in zip(outputs, self.output_types)]


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return OrtRunner(model).run(feeds)


def _ort_bits(array: np.ndarray) -> tuple[np.ndarray, int]:
    array = np.ascontiguousarray(array)
    elem = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
    if array.dtype.itemsize == 1 and array.dtype.kind == "V":  # ml_dtypes float8
        return array.view(np.uint8), elem
    if str(array.dtype) == "bfloat16":
        return array.view(np.uint16), elem
    return array, elem


def _from_bits(array: np.ndarray, elem: int) -> np.ndarray:
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
    return array.view(dtype) if array.dtype != dtype and array.dtype.itemsize == np.dtype(dtype).itemsize else array
