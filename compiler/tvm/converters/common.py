"""Small helpers shared by the converters: static/symbolic shapes, dtypes, scalar constants."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import tvm
from tvm import relax

from kvc.errors import GraphError

NEG_INF = float("-inf")
CONTEXT_KEY = "kvc_context"  # where the importer puts a NodeContext among a node's attributes


@dataclass(frozen=True)
class NodeContext:
    """What kvc's importer tells a converter beyond TVM's (inputs, attributes)."""

    attention_kernels: bool  # kvc's TIR attention kernels may be used (llvm builds)
    kernel_chunk_size: int
    prefill_query_tile: int
    gpu_attention_kernels: bool = False  # kvc's GPU attention kernels may be used (CUDA builds)
    hardware_half: bool = False  # the CPU target converts float16 in hardware (x86 F16C)
    avx512_int16: bool = False  # the CPU target has AVX-512 BW (int8 decode attention multiplies integers)
    # One dict for the whole import: expressions a converter emitted that other nodes may reuse
    # (keyed by the converter; e.g. RotaryEmbedding's per-token cos/sin rows, the same in every layer).
    shared: dict = field(default_factory=dict, compare=False)


def shape_of(expr: relax.Expr, op: str) -> list:
    """The dims of a tensor of known rank: Python ints where static, tir expressions where symbolic."""
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.ndim == -1 or ty.shape is None:
        raise GraphError(f"{op}: an input has an unknown shape; give it in the graph inputs or shape_dict")
    return [int(d) if isinstance(d, tvm.tirx.IntImm) else d for d in ty.shape.values]


def static_dim(dim, op: str, what: str) -> int:
    if isinstance(dim, int):
        return dim
    raise GraphError(f"{op}: {what} must be static, got symbolic '{dim}'; pin it with shape_dict")


def dtype_of(expr: relax.Expr) -> str:
    return str(expr.ty.dtype)


def scalar(value: float | int, dtype: str) -> relax.Expr:
    """A rank-0 constant (-inf is kept exactly, also in float16)."""
    return relax.const(np.array(value, dtype=numpy_dtype(dtype)), dtype)


def numpy_dtype(dtype: str):
    if dtype in ("bfloat16", "float8_e4m3fn"):
        import ml_dtypes

        return getattr(ml_dtypes, dtype)
    return np.dtype(dtype)


def onnx_dtype_name(onnx_elem_type: int) -> str:
    """ONNX TensorProto element type -> TVM dtype string."""
    return str(onnx.helper.tensor_dtype_to_np_dtype(onnx_elem_type))


def positive_axis(axis: int, rank: int, op: str) -> int:
    if not -rank <= axis < rank:
        raise GraphError(f"{op}: axis {axis} is out of range for a rank-{rank} input")
    return axis % rank


def outputs(values: list[relax.Expr], attr: dict) -> relax.Expr:
    """As many results as the node names (the importer maps them by position)."""
    wanted = attr["tvm_custom"]["num_outputs"]
    return values[0] if wanted == 1 else relax.Tuple(values[:wanted])


def simplify_dim(dim):
    """An int when a dim expression is provably constant (e.g. T - T), else the simplified expression."""
    if isinstance(dim, int):
        return dim
    from tvm.sym import Analyzer

    simplified = Analyzer().simplify(dim)
    return int(simplified) if isinstance(simplified, tvm.tirx.IntImm) else simplified
