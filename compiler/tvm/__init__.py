"""kvc's TVM engine: ONNX import with converters for the fused ops, own TIR kernels, targets."""
