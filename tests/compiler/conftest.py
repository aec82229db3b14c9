"""Fixtures for the TVM engine tests."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def llvm_fast():
    """LLVM at -O0: the same float results as -O3 (no fast-math at any level), built several times faster
    (the kernel tests build at the default -O3)."""
    from kvc.compiler.tvm.target import TargetSpec

    return TargetSpec(llvm_opt_level=0)


@pytest.fixture(scope="session")
def stories260k_variants(tmp_path_factory):
    """Factory: {name: extra `kvc compile` flags} -> {name: artifact} for the real stories260K (exported once
    per session, each variant compiled once, capacity 512); skips without ../shared/models/stories260K."""
    from click.testing import CliRunner

    from kvc.cli.main import cli
    from tests.conftest import STORIES260K

    if not STORIES260K.is_dir():
        pytest.skip("../shared/models/stories260K is not present")
    root = tmp_path_factory.mktemp("stories260k")
    onnx_path = root / "m" / "model.onnx"
    runner = CliRunner()
    compiled: dict[tuple, object] = {}

    def make(variants: dict[str, list[str]]) -> dict:
        if not onnx_path.exists():
            exported = runner.invoke(cli, ["export", str(STORIES260K / "stories260K.bin"), "-o", str(onnx_path)])
            assert exported.exit_code == 0, exported.output
        out = {}
        for name, flags in variants.items():
            key = tuple(flags)
            if key not in compiled:
                artifact = root / f"variant{len(compiled)}.kvc"
                result = runner.invoke(cli, ["compile", str(onnx_path), "-o", str(artifact), "--max-seq-len", "512",
                                             *flags])
                assert result.exit_code == 0, result.output
                compiled[key] = artifact
            out[name] = compiled[key]
        return out

    make.onnx_path = onnx_path
    make.root = root
    return make
