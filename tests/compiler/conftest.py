"""Fixtures for the TVM engine tests."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def llvm_fast():
    """LLVM at -O0: the same float results as -O3 (no fast-math at any level), built several times faster
    (the kernel tests build at the default -O3)."""
    from kvc.compiler.tvm.target import TargetSpec

    return TargetSpec(llvm_opt_level=0)
