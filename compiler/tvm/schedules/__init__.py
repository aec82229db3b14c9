"""Schedules kvc applies to the TIR of imported graphs (its own kernels carry their own)."""
from kvc.compiler.tvm.schedules.cpu_matmul import CpuWeightMatmul, MatmulTiles

__all__ = ["CpuWeightMatmul", "MatmulTiles"]
