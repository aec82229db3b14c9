"""kvc's ONNX -> Relax converters: the standard ops TVM's importer lacks or gets wrong, and the
engine-private ai.kvc ops kvc's TVM lowering passes write (kvc.contract)."""
from __future__ import annotations

from kvc.compiler.tvm.converters.attention import Attention
from kvc.compiler.tvm.converters.cache_attention import CacheAttention
from kvc.compiler.tvm.converters.cast import Cast
from kvc.compiler.tvm.converters.packed_matmul import PackedGather, PackedMatMul
from kvc.compiler.tvm.converters.quantize import DequantizeLinear, QuantizeLinear
from kvc.compiler.tvm.converters.quantized_ring_write import QuantizedRingWrite
from kvc.compiler.tvm.converters.range import Range
from kvc.compiler.tvm.converters.rms_normalization import RMSNormalization
from kvc.compiler.tvm.converters.rotary_embedding import RotaryEmbedding
from kvc.compiler.tvm.converters.tensor_scatter import TensorScatter
from kvc.contract import CACHE_ATTENTION_OP, PACKED_GATHER_OP, PACKED_MATMUL_OP, QUANTIZED_RING_WRITE_OP

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
KVC_CONVERTERS = {CACHE_ATTENTION_OP: CacheAttention, PACKED_MATMUL_OP: PackedMatMul,
                  PACKED_GATHER_OP: PackedGather, QUANTIZED_RING_WRITE_OP: QuantizedRingWrite}  # domain ai.kvc

__all__ = ["CONVERTERS", "KVC_CONVERTERS"]
