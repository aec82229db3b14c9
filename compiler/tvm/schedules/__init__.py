"""Schedules kvc applies to the TIR of imported graphs (its own kernels carry their own)."""
from kvc.compiler.tvm.schedules.cpu_matmul import CpuWeightMatmul, MatmulTiles
from kvc.compiler.tvm.schedules.cpu_packed_matmul import CpuPackedMatmul
from kvc.compiler.tvm.schedules.cpu_row_reduction import CpuRowReduction

__all__ = ["CpuPackedMatmul", "CpuRowReduction", "CpuWeightMatmul", "MatmulTiles"]
