"""kvc's TVM engine pieces: ONNX import with converters for the fused standard ops (onnx_import,
converters/), own TIR kernels (kernels/), and targets and the build (target)."""
from kvc.compiler.tvm.onnx_import import ImportOptions, from_onnx
from kvc.compiler.tvm.target import TargetKind, TargetSpec, build, cuda_codegen_available

__all__ = ["ImportOptions", "TargetKind", "TargetSpec", "build", "cuda_codegen_available", "from_onnx"]
