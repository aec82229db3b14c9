"""Compile targets for kvc's TVM engine, and the build of an imported Relax module.

TVM 0.27 takes targets as dicts (its "llvm -mcpu=..." strings are gone). For CUDA, TVM's default Relax
pipeline legalizes, fuses and then schedules every unscheduled kernel with dlight's GPU rules
(tvm.s_tir.dlight.ApplyDefaultSchedule with gpu.Matmul, GEMV, Reduction, GeneralReduction, Fallback);
kernels kvc writes itself are marked scheduled and left alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import tvm
from tvm import relax

from kvc.errors import KvcError

CPU_ONLY_ATTR = "kvc.cpu_only"  # set on kvc kernels scheduled for llvm only (kernels.decode_attention)


class TargetKind(Enum):
    LLVM = "llvm"
    CUDA = "cuda"


@dataclass(frozen=True)
class TargetSpec:
    kind: TargetKind = TargetKind.LLVM
    cuda_arch: str = "sm_90"  # CUDA only
    llvm_opt_level: int | None = None  # LLVM only; None = LLVM's default (-O3)
    llvm_cpu: str | None = None  # LLVM only; None = generic x86-64 (portable); host_cpu() for this machine
    num_cores: int | None = None  # LLVM only; MetaSchedule requires it in the target

    def tvm_target(self) -> tvm.target.Target:
        if self.kind is TargetKind.CUDA:
            if not cuda_codegen_available():
                raise KvcError("this TVM build has no CUDA code generator; install a CUDA-enabled apache-tvm "
                               "or compile for llvm")
            # the limits MetaSchedule's CUDA rules read (every GPU since Volta: 1024 threads, 48 KiB
            # of static shared memory per block); kvc's attention kernels stay within them too
            return tvm.target.Target({"kind": "cuda", "arch": self.cuda_arch, "max_threads_per_block": 1024,
                                      "max_shared_memory_per_block": 48 * 1024, "thread_warp_size": 32},
                                     host={"kind": "llvm"})
        attrs = {"kind": "llvm"}
        if self.num_cores is not None:
            attrs["num-cores"] = self.num_cores
        if self.llvm_opt_level is not None:
            attrs["opt-level"] = self.llvm_opt_level
        if self.llvm_cpu is not None:
            attrs["mcpu"] = self.llvm_cpu
        return tvm.target.Target(attrs)

    @property
    def device(self) -> tvm.runtime.Device:
        return tvm.cuda() if self.kind is TargetKind.CUDA else tvm.cpu()


def host_cpu() -> str:
    """LLVM's name for this machine's CPU (e.g. "znver3"): its vector units, but a library built
    for it may not run on another CPU. kvc's decode kernel runs ~2x faster with AVX2 than generic."""
    from tvm.target import codegen

    return codegen.llvm_get_system_cpu()


def converts_half_in_hardware(target: tvm.target.Target) -> bool:
    """Whether an llvm target has x86's F16C (float16 <-> float32 conversion instructions); without it LLVM
    converts each float16 with a library call."""
    from tvm.target import codegen

    return target.kind.name == "llvm" and bool(codegen.target_has_features("f16c", target))


def has_avx512(target: tvm.target.Target) -> bool:
    """Whether an llvm target has AVX-512 (32 vector registers of 16 float32 lanes)."""
    from tvm.target import codegen

    return target.kind.name == "llvm" and bool(codegen.target_has_features("avx512f", target))


def has_avx512bw(target: tvm.target.Target) -> bool:
    """Whether an llvm target has AVX-512 BW (512-bit int8/int16 arithmetic, e.g. vpmaddwd)."""
    from tvm.target import codegen

    return target.kind.name == "llvm" and bool(codegen.target_has_features("avx512bw", target))


def cuda_codegen_available() -> bool:
    """Whether TVM can generate CUDA code (a GPU is not needed for that, only to run it)."""
    return tvm.get_global_func("target.build.cuda", allow_missing=True) is not None


def build(mod: tvm.IRModule, spec: TargetSpec) -> relax.VMExecutable:
    """Compile a Relax module for the relax VM."""
    if spec.kind is not TargetKind.LLVM:
        cpu_only = sorted(gv.name_hint for gv, func in mod.functions_items()
                          if isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None
                          and CPU_ONLY_ATTR in func.attrs)
        if cpu_only:
            raise KvcError(f"the module holds CPU-only kernels ({', '.join(cpu_only)}); import it with "
                           f"ImportOptions(target_kind=TargetKind.{spec.kind.name}) to build for {spec.kind.value}")
    return tvm.compile(mod, target=spec.tvm_target())
