"""Operator fusion for the `decode` entry only.

A decode step runs ~700 small kernels per token without fusion, and the Relax VM's per-call work
(shape tuples, tensor allocation) then costs about as much as the attention itself. TVM's FuseOps
+ FuseTIR merge elementwise chains and matmul epilogues into one kernel each. They cannot run on
`prefill` (TVM 0.27 then loses the definition of the data-dependent query length in
VMShapeLower), so decode and the kernels it calls are fused in a module of their own and merged
back; kernels prefill shares stay unfused for prefill.
"""
from __future__ import annotations

import tvm
from tvm import relax

from kvc.contract import Entry


def fuse_decode(mod: tvm.IRModule, entry: str = Entry.DECODE.value) -> tvm.IRModule:
    """``mod`` after LegalizeOps, with ``entry`` and its kernels fused; other functions unchanged."""
    decode_gv = mod.get_global_var(entry)
    fused = _fuse(_reachable_module(mod, decode_gv))
    others = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv != decode_gv})
    others = relax.transform.DeadCodeElimination([gv.name_hint for gv, f in others.functions_items()
                                                  if isinstance(f, relax.Function)])(others)
    bb = relax.BlockBuilder(others)
    renamed = {gv: bb.add_func(f, gv.name_hint) for gv, f in fused.functions_items() if gv.name_hint != entry}
    bb.add_func(rename_global_vars(fused[entry], renamed), entry)
    return bb.get()


def _reachable_module(mod: tvm.IRModule, root: tvm.ir.GlobalVar) -> tvm.IRModule:
    """``root`` and every function it calls (transitively), nothing else."""
    keep, stack = {}, [root]
    while stack:
        gv = stack.pop()
        if gv.name_hint in keep:
            continue
        func = mod[gv]
        keep[gv.name_hint] = (gv, func)
        if isinstance(func, relax.Function):
            stack.extend(relax.analysis.all_global_vars(func))
    return tvm.IRModule({gv: func for gv, func in keep.values()})


OPAQUE = 8  # TVM's OpPatternKind::kOpaque: FuseOps leaves such a kernel on its own


def _fuse(mod: tvm.IRModule) -> tvm.IRModule:
    mod = relax.transform.AnnotateTIROpPattern()(mod)
    for gv, func in list(mod.functions_items()):
        if isinstance(func, tvm.tirx.PrimFunc) and _keep_separate(func):
            mod[gv] = func.with_attr("op_pattern", OPAQUE)
    return tvm.transform.Sequential([relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)


def _keep_separate(func: tvm.tirx.PrimFunc) -> bool:
    """kvc's own kernels: the scheduled attention kernels, and the exact float8 codecs (fused,
    TVM's lowering bitcasts their float math straight to float8 and fails LLVM verification)."""
    if func.attrs is not None and "tirx.is_scheduled" in func.attrs:
        return True
    return any(str(getattr(p, "dtype", "")).startswith("float8") for p in func.params)


def rename_global_vars(func: relax.Function, mapping: dict) -> relax.Function:
    """``func`` with the GlobalVars it calls replaced per ``mapping``."""
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class Rename(PyExprMutator):
        def visit_global_var_(self, op):  # noqa: N802 - TVM's visitor naming
            return mapping.get(op, op)

    return Rename().visit_expr(func)
