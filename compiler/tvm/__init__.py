"""kvc's TVM engine: the one ONNX -> Relax importer (onnx_import.from_onnx, with converters/ for the fused
standard ops and inplace for ring writes), own TIR kernels (kernels/), schedules, tuning, targets
(target), the engine build (engine_build) and its --dump-passes output (relax_dump)."""
from kvc.compiler.tvm.onnx_import import ImportOptions, from_onnx
from kvc.compiler.tvm.target import TargetKind, TargetSpec, build, cuda_codegen_available

__all__ = ["ImportOptions", "TargetKind", "TargetSpec", "build", "cuda_codegen_available", "from_onnx"]
