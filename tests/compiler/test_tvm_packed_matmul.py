"""ai.kvc PackedMatMul on TVM: the converter's kernel under kvc's CPU schedule, against numpy on the
same weights (fresh seeded inputs). Weights: fp32 / fp16 re-laid out, and int8 / int4 codes made by the
weight-quantization codec (symmetric and asymmetric, blocks of 32 and 128, a partial last block),
packed by kvc.passes.lower_tvm_weight_codes. The numpy reference decodes the *unpacked* codes with
the codec (kvc.passes.weight_quantize.dequantize_blocks), so a packing or nibble-order error fails."""
from __future__ import annotations

import zlib

import ml_dtypes
import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import te, tirx  # noqa: E402

from kvc.compiler.tvm.converters.packed_matmul import _packed_matmul_te  # noqa: E402
from kvc.compiler.tvm.schedules import CpuPackedMatmul  # noqa: E402
from kvc.compiler.tvm.schedules.cpu_packed_matmul import RowTile, batched_row_tile  # noqa: E402
from kvc.passes.lower_tvm_weight_codes import PackedWeight, pack_float, pack_quantized, unpack  # noqa: E402
from kvc.passes.weight_quantize import dequantize_blocks, quantize_blocks  # noqa: E402

LLVM = tvm.target.Target({"kind": "llvm"})
TOLERANCE = 2e-4  # fp32 sums in another order (as tests/compiler/test_weight_precision.py)


def i64(value: int):
    return tirx.IntImm("int64", value)


def packed_and_reference(scheme: str, k: int, n: int, rng) -> tuple[PackedWeight, np.ndarray]:
    """The packed weight and the float32 W [K, N] it stands for (decoded from the unpacked codes)."""
    w = rng.standard_normal((k, n)).astype(np.float32)
    if scheme == "fp32":
        return pack_float(w), w
    if scheme in ("fp16", "bf16"):
        half = w.astype(np.float16 if scheme == "fp16" else ml_dtypes.bfloat16)
        return pack_float(half), half.astype(np.float32)
    kind, symmetry, block = scheme.split("-")  # e.g. int4-asym-128
    bits, symmetric, block = int(kind[3:]), symmetry == "sym", int(block)
    q = quantize_blocks(w, bits, block, symmetric, axis=0)
    reference = dequantize_blocks(q, block, axis=0)
    zp = None if q.zero_point is None else q.zero_point.astype(np.int32)
    return pack_quantized(q.codes.astype(np.int32), bits, symmetric, q.scale, zp, block), reference


def packed_matmul_func(packed: PackedWeight, rows: tuple, with_residual: bool):
    attrs = packed.attributes
    k, n = attrs["K"], attrs["N"]
    x = te.placeholder((*rows, i64(k)), "float32", name="x")
    tensors = [te.placeholder([i64(d) for d in a.shape], str(a.dtype), name=name)
               for name, a in (("codes", packed.codes), ("scale", packed.scale), ("zp", packed.zero_point))
               if a is not None]
    codes, scale, zp = tensors[0], (tensors[1] if len(tensors) > 1 else None), (tensors[2] if len(tensors) > 2 else None)
    y = _packed_matmul_te(x, codes, scale, zp, k, n, attrs["tile"], attrs["bits"], attrs["block_size"],
                          attrs["code_offset"])
    args = [x, *tensors]
    if with_residual:  # an epilogue the decode fusion puts in the same kernel
        res = te.placeholder((*rows, i64(n)), "float32", name="res")
        y = te.compute(y.shape, lambda *i: y(*i) + res(*i), name="residual")
        args.append(res)
    return te.create_prim_func(args + [y])


def run(packed: PackedWeight, x: np.ndarray, rows: tuple, residual: np.ndarray | None,
        target: tvm.target.Target = LLVM) -> np.ndarray:
    func = packed_matmul_func(packed, rows, residual is not None)
    sch = CpuPackedMatmul().apply(func, target, False)
    assert sch is not None, "the packed-matmul rule did not take its kernel"
    lib = tvm.compile(sch.mod, target=target)
    out = tvm.runtime.tensor(np.zeros(x.shape[:-1] + (packed.attributes["N"],), np.float32))
    weights = [a for a in (packed.codes, packed.scale, packed.zero_point) if a is not None]
    extra = [] if residual is None else [residual]
    lib(*[tvm.runtime.tensor(a) for a in [x, *weights, *extra]], out)
    return out.numpy()


SCHEMES = ["fp32", "fp16", "bf16", "int8-sym-32", "int8-asym-128", "int4-sym-32", "int4-sym-128", "int4-asym-32",
           "int4-asym-128"]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("batch, seq, k, n", [
    (1, 1, 160, 512),  # decode: K = 160 leaves a partial last block of 128; N = 512 -> tile 32
    (2, 5, 96, 96),  # prefill rows not a multiple of the 4-row tile; N = 96 -> tile 16
])
def test_packed_matmul_equals_numpy(scheme, batch, seq, k, n):
    rng = np.random.default_rng(zlib.crc32(f"{scheme}-{batch}-{seq}".encode()))
    packed, w = packed_and_reference(scheme, k, n, rng)
    np.testing.assert_array_equal(unpack(packed), w)  # the layout round-trips exactly
    code_bytes = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "int4": 0.5}[scheme.split("-")[0]]
    assert packed.codes.nbytes == k * n * code_bytes  # stored at the scheme's width
    b, s = tirx.Var("batch", "int64"), tirx.Var("seq", "int64")
    rows = (b, i64(1)) if seq == 1 else (b, s)
    x = rng.standard_normal((batch, seq, k)).astype(np.float32)
    residual = rng.standard_normal((batch, seq, n)).astype(np.float32)
    got = run(packed, x, rows, residual)
    want = x.astype(np.float64) @ w.astype(np.float64) + residual
    worst = float(np.abs(got - want).max())
    assert worst <= TOLERANCE, f"{scheme}: max |tvm - numpy| = {worst:.2e}"


def test_static_single_row_decode_uses_the_whole_tile():
    rng = np.random.default_rng(3)
    packed, w = packed_and_reference("int4-sym-32", 64, 1024, rng)
    assert packed.attributes["tile"] == 64 and packed.codes.shape == (16, 64, 32)  # two codes per byte
    x = rng.standard_normal((1, 1, 64)).astype(np.float32)
    got = run(packed, x, (i64(1), i64(1)), None)
    np.testing.assert_allclose(got, x.astype(np.float64) @ w, rtol=0, atol=TOLERANCE * 10)


def _host_avx512_target() -> tvm.target.Target:
    from kvc.compiler.tvm.target import TargetSpec, host_cpu

    target = TargetSpec(llvm_cpu=host_cpu()).tvm_target()
    if batched_row_tile(target, 64) is None:
        pytest.skip(f"this CPU ({host_cpu()}) has no AVX-512: batched decode keeps one row per task")
    return target


@pytest.mark.parametrize("scheme", ["fp32", "fp16", "int8-asym-128", "int4-sym-32", "int4-asym-32"])
@pytest.mark.parametrize("batch", [1, 3, 4, 6, 9])
def test_batched_decode_row_tiles_equal_numpy(scheme, batch):
    """A symbolic batch on AVX-512 runs in row groups whose full groups compile without the batch check:
    batches that fill them, leave a partial last group, or are smaller than one group."""
    target = _host_avx512_target()
    rng = np.random.default_rng(zlib.crc32(f"rows-{scheme}-{batch}".encode()))
    packed, w = packed_and_reference(scheme, 160, 512, rng)
    x = rng.standard_normal((batch, 1, 160)).astype(np.float32)
    residual = rng.standard_normal((batch, 1, 512)).astype(np.float32)
    got = run(packed, x, (tirx.Var("batch", "int64"), i64(1)), residual, target)
    want = x.astype(np.float64) @ w.astype(np.float64) + residual
    assert float(np.abs(got - want).max()) <= TOLERANCE


def test_batched_row_tile_follows_the_vector_registers():
    avx512 = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})
    avx2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    assert batched_row_tile(avx512, 64) == RowTile(rows=4, lanes=16)  # 16 accumulators of 32 registers
    assert batched_row_tile(avx512, 16) == RowTile(rows=4, lanes=16)
    assert batched_row_tile(avx2, 64) is None and batched_row_tile(LLVM, 64) is None


def test_unannotated_matmuls_are_left_to_other_rules():
    from tests.compiler.test_tvm_schedules import weight_matmul

    assert CpuPackedMatmul().apply(weight_matmul((i64(1), i64(1)), 16, 16), LLVM, False) is None


@pytest.mark.parametrize("scheme", ["int8-sym-32", "int4-sym-32", "int4-asym-128"])
def test_packed_gather_reads_embedding_rows(scheme):
    """A tied table E [V, H] is packed as W = E^T; PackedGather's rows are E's decoded rows."""
    from kvc.compiler.tvm.converters.packed_matmul import PackedGather  # noqa: F401  (the converter's kernel)
    from kvc.compiler.tvm.converters.packed_matmul import _PackedWeight

    rng = np.random.default_rng(zlib.crc32(scheme.encode()))
    packed, w = packed_and_reference(scheme, 160, 256, rng)  # W [K = H, N = V]
    attrs = packed.attributes
    weight = _PackedWeight(attrs["K"], attrs["N"], attrs["tile"], attrs["bits"], attrs["block_size"],
                           attrs["code_offset"])
    tensors = [te.placeholder([i64(d) for d in a.shape], str(a.dtype), name=name)
               for name, a in (("codes", packed.codes), ("scale", packed.scale), ("zp", packed.zero_point))
               if a is not None]
    ids = te.placeholder((i64(2), i64(3)), "int64", name="ids")
    decode = weight.decoder(*tensors, *([None] * (3 - len(tensors))))
    rows = te.compute((i64(2), i64(3), i64(attrs["K"])), lambda a, b, h: decode(ids[a, b], h), name="rows")
    lib = tvm.compile(te.create_prim_func([tensors[0], ids, *tensors[1:], rows]), target=LLVM)
    token_ids = rng.integers(0, attrs["N"], (2, 3)).astype(np.int64)
    out = tvm.runtime.tensor(np.zeros((2, 3, attrs["K"]), np.float32))
    weights = [a for a in (packed.scale, packed.zero_point) if a is not None]
    lib(*[tvm.runtime.tensor(a) for a in [packed.codes, token_ids, *weights]], out)
    np.testing.assert_array_equal(out.numpy(), w.T[token_ids])


# --- the engine: the packed path end to end ---------------------------------------------------------

def _pass_report(artifact, name: str) -> dict:
    import json

    from kvc.contract import MANIFEST_FILE

    manifest = json.loads((artifact / MANIFEST_FILE).read_text())
    return {p["name"]: p for p in manifest["passes"]}[name]


def test_packed_engine_equals_onnx_runtime(compiled):
    """fp32 weights, every projection and the (untied) lm_head packed: TVM logits = ORT CPU's within 1e-4
    (the tolerance of tests/compiler/test_tvm_engine.py), prefill and 12 decode steps."""
    from kvc.runtime import load
    from tests.compiler.test_tvm_engine import logits_trace

    tvm_artifact = compiled("tiny", capacity=96, engine="tvm")
    assert _pass_report(tvm_artifact, "lower_tvm_weight_codes")["matched"] == 2 * 7 + 1  # 7 per layer + lm_head
    prompt, tokens = [3, 14, 15, 92, 65], [89, 79, 32, 38, 46, 26, 43, 38, 32, 79, 50, 28]
    ort = logits_trace(load(compiled("tiny", capacity=96)), prompt, tokens)
    got = logits_trace(load(tvm_artifact), prompt, tokens)
    worst = max(float(np.abs(a - b).max()) for a, b in zip(got, ort))
    assert worst <= 1e-4, f"max |tvm packed - ort| = {worst:.2e}"


@pytest.mark.parametrize("scheme", ["int4", "bf16"])
def test_tied_table_is_packed_once_and_equals_the_same_scheme_reference(exported, tmp_path, scheme):
    """tiny-qwen2 (tied lm_head), int4 symmetric block 32 or bf16: the table is stored once, packed (int4: two codes
    per byte), read by PackedGather (lookups) and PackedMatMul (lm_head), never widened or transposed whole at run
    time; logits equal the fp32 export with the same scheme's decoded weights on ONNX Runtime within 2e-4."""
    from safetensors.numpy import load_file

    from kvc.contract import PARAMS_FILE, WeightDtype
    from kvc.passes.weight_quantize import WeightQuantOptions
    from kvc.runtime import load
    from tests.compiler.test_weight_precision import compile_to, same_scheme_export, worst_difference

    options = WeightQuantOptions(WeightDtype.INT4, block_size=32) if scheme == "int4" else WeightQuantOptions(
        WeightDtype.BF16)
    onnx_path = exported("tiny-qwen2")[2]
    artifact = compile_to(onnx_path, tmp_path / "q.kvc", "tvm", options)
    assert _pass_report(artifact, "lower_tvm_weight_codes")["matched"] == 2 * 7 + 2  # + lm_head and lookup
    tables = [(n, a) for n, a in load_file(str(artifact / PARAMS_FILE)).items() if "embed_tokens" in n]
    assert len(tables) == (1 if scheme == "bf16" else 2), [(n, a.shape) for n, a in tables]  # (int4: + scales)
    codes = [a for n, a in tables if n.endswith(".packed")]
    size, dtype = (256 * 64 // 2, np.uint8) if scheme == "int4" else (256 * 64, ml_dtypes.bfloat16)
    assert len(codes) == 1 and codes[0].dtype == dtype and codes[0].size == size, [(n, a.shape) for n, a in tables]
    reference = load(compile_to(same_scheme_export(onnx_path, tmp_path / "ref", options), tmp_path / "ref.kvc"))
    worst = worst_difference(load(artifact), reference)
    assert worst <= 2e-4, f"max |tvm int4 - reference| = {worst:.2e}"
