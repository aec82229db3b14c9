"""kvc's ONNX -> Relax converters for the ops TVM's importer lacks or gets wrong (standard domain only)."""
from __future__ import annotations

from kvc.compiler.tvm.converters.attention import Attention
from kvc.compiler.tvm.converters.cast import Cast
from kvc.compiler.tvm.converters.quantize import DequantizeLinear, QuantizeLinear
from kvc.compiler.tvm.converters.range import Range
from kvc.compiler.tvm.converters.rms_normalization import RMSNormalization
from kvc.compiler.tvm.converters.rotary_embedding import RotaryEmbedding
from kvc.compiler.tvm.converters.tensor_scatter import TensorScatter

CONVERTERS = {
    "Attention": Attention,
    "RotaryEmbedding": RotaryEmbedding,
    "RMSNormalization": RMSNormalization,
    "TensorScatter": TensorScatter,
    "QuantizeLinear": QuantizeLinear,
    "DequantizeLinear": DequantizeLinear,
    "Cast": Cast,
    "Range": Range,
}

__all__ = ["CONVERTERS"]
