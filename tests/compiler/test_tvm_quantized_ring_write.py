"""ai.kvc QuantizedRingWrite: the fused int8 / fp8 cache write, vs kvc's numpy codec (kvc.passes.kv_codec), and
the lowering pass that forms it from the quantize pass's standard ops.

Random values with an all-zero token (scale 1) and one token at the int8 rounding tie of .5; batch rows at
different write indices, one wrapping past the ring's end; one decode token and a chunk of 5. Codes and scales
must equal the codec's bit for bit (int8 and e4m3fn round half to even and saturate in both); slots not
written keep their old contents. Both the in-place kernel (llvm, cache parameters) and the standard-op form
(CUDA, or a functional import) are checked.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from tvm_case_helpers import call_vm, load_vm

CAPACITY, HEADS, HEAD_DIM = 12, 2, 32
WRITE_INDEX = np.array([3, 10], np.int64)  # row 1 wraps at 12 for a chunk of 5
STORED = {"int8": np.int8, "float8_e4m3fn": ml_dtypes.float8_e4m3fn}


def _module(dtype: str, seq: int, in_place: bool):
    import tvm
    from tvm import relax

    from kvc.compiler.tvm.converters.common import CONTEXT_KEY, NodeContext
    from kvc.compiler.tvm.converters.quantized_ring_write import QuantizedRingWrite, _standard_ops
    from kvc.compiler.tvm.target import TargetSpec, build

    batch = len(WRITE_INDEX)
    codes = relax.Var("codes", relax.TensorType((batch, HEADS, CAPACITY, HEAD_DIM), dtype))
    scales = relax.Var("scales", relax.TensorType((batch, HEADS, CAPACITY, 1), "float32"))
    x = relax.Var("x", relax.TensorType((batch, HEADS, seq, HEAD_DIM), "float32"))
    index = relax.Var("index", relax.TensorType((batch,), "int64"))
    bb = relax.BlockBuilder()
    with bb.function("main", [codes, scales, x, index]):
        with bb.dataflow():
            if in_place:
                context = NodeContext(attention_kernels=True, kernel_chunk_size=64, prefill_query_tile=16)
                out = QuantizedRingWrite._impl_v1(bb, [codes, scales, x, index], {CONTEXT_KEY: context}, None)
            else:
                out = _standard_ops(bb, codes, scales, x, index)
            out = bb.emit_output(out)
        bb.emit_func_output(out)
    module = bb.get()
    kernels = [gv.name_hint for gv in module.functions if gv.name_hint.startswith("quantized_ring_write")]
    assert len(kernels) == int(in_place), kernels  # the fused kernel exactly where it applies
    return load_vm(build(module, TargetSpec()))


def _values(rng, seq: int) -> np.ndarray:
    x = rng.standard_normal((len(WRITE_INDEX), HEADS, seq, HEAD_DIM)).astype(np.float32)
    x[0, 1, 0] = 0.0  # all-zero token: scale 1, codes 0
    x[1, 0, 0, :2] = [127.0, 0.5]  # scale 1 for int8: 0.5 is a tie, rounds to even (0)
    return x


@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "standard-ops"])
@pytest.mark.parametrize("seq", [1, 5], ids=["decode", "chunk"])
@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3fn"])
def test_fused_write_equals_the_codec(dtype, seq, in_place, rng):
    from kvc.contract import KvDtype
    from kvc.passes.kv_codec import encode

    kv_dtype = KvDtype.INT8 if dtype == "int8" else KvDtype.FP8
    old_codes = rng.integers(-100, 100, (len(WRITE_INDEX), HEADS, CAPACITY, HEAD_DIM)).astype(np.int8)
    if dtype != "int8":
        old_codes = old_codes.astype(np.float32).astype(STORED[dtype])
    old_scales = rng.uniform(0.5, 2.0, (len(WRITE_INDEX), HEADS, CAPACITY, 1)).astype(np.float32)
    x = _values(rng, seq)
    encoded = encode(x, kv_dtype)
    want_codes, want_scales = old_codes.copy(), old_scales.copy()
    for b, start in enumerate(WRITE_INDEX):
        slots = (start + np.arange(seq)) % CAPACITY
        want_codes[b, :, slots] = encoded.data[b].transpose(1, 0, 2)
        want_scales[b, :, slots] = encoded.scale[b].transpose(1, 0, 2)
    got_codes, got_scales = call_vm(_module(dtype, seq, in_place), [old_codes, old_scales, x, WRITE_INDEX])
    np.testing.assert_array_equal(got_scales, want_scales)
    np.testing.assert_array_equal(got_codes.view(np.uint8), want_codes.view(np.uint8))


def test_lowering_fuses_each_per_token_cache_write_and_nothing_else(exported):
    """int8 and dynamic fp8: one QuantizedRingWrite per cache (2 per layer), no scale ring scatter left;
    fp16 (a Cast on write) and static fp8 (constant scales) keep their form."""
    from collections import Counter

    from kvc.contract import KvDtype, QUANTIZED_RING_WRITE_OP
    from kvc.passes.graph_checks import load_model_checked
    from kvc.passes.kv_layout import Fp8Scales
    from kvc.passes.lower_tvm_quantized_writes import LowerTvmQuantizedWritesPass
    from kvc.passes.pipeline import PipelineOptions, default_passes, run_passes

    _, config, path = exported("tiny")
    static = Fp8Scales(key=((0.1, 0.1),) * config.num_layers, value=((0.1, 0.1),) * config.num_layers)
    for kv, scales, fused in (("int8", None, 2 * config.num_layers), ("fp8", None, 2 * config.num_layers),
                              ("fp8", static, 0), ("fp16", None, 0)):
        model = load_model_checked(path)
        run_passes(model, default_passes(PipelineOptions(capacity=16, kv_dtype=KvDtype(kv), fp8_scales=scales)))
        lowering = LowerTvmQuantizedWritesPass()
        lowering(model)
        counts = Counter(n.op_type for n in model.graph)
        assert lowering.report.matched == counts[QUANTIZED_RING_WRITE_OP] == fused, (kv, scales)
        if fused:  # the standard ops of the write are gone
            assert counts["TensorScatter"] == counts["QuantizeLinear"] == counts["ReduceMax"] == 0, counts
        else:
            assert counts["TensorScatter"] == 2 * config.num_layers, counts
