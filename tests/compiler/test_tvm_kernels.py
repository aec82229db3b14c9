"""kvc's own TIR: the exact float8 codec and the flash-decoding attention kernel, on llvm, vs numpy.

* float8: all 256 codes decode like ml_dtypes (also through the hardware float16 conversion); encoding of every
  code, every midpoint between neighbours (ties to even), random values over 7 decades and inf/NaN, saturating
  and not, matches ml_dtypes bit for bit.
* decode / prefill attention (built for generic x86-64 and for this CPU, whose F16C decodes fp8 caches through
  float16): random q / caches / masks, per-batch lengths 0, a partial chunk, the full capacity and beyond it
  (read as the capacity; prefill's causal offset keeps the given length);
  every cache slot at or past a sequence's length is NaN (in the cache, its scales and the mask), so any
  read of one would show; compared with a float64 numpy softmax over the dequantized valid slots:
  atol 1e-5 for float32 math, 2e-3 where the query/output is float16 (half a float16 ulp near 4).
"""
from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import pytest

from tvm_case_helpers import call_vm, load_vm

FORMATS = ("float8_e4m3fn", "float8_e5m2")


# --- float8 codec ---------------------------------------------------------------------------------

def _codec_module(dtype: str, saturate: bool, n_values: int):
    import tvm
    from tvm import relax

    from kvc.compiler.tvm.kernels.float8 import emit_decode, emit_encode
    from kvc.compiler.tvm.target import TargetSpec, build

    bb = relax.BlockBuilder()
    codes = relax.Var("codes", relax.TensorType((256,), dtype))
    values = relax.Var("values", relax.TensorType((n_values,), "float32"))
    halves = relax.Var("halves", relax.TensorType((n_values,), "float16"))
    with bb.function("main", [codes, values, halves]):
        with bb.dataflow():
            out = bb.emit_output(relax.Tuple([emit_decode(bb, codes), emit_decode(bb, codes, "float16"),
                                              emit_encode(bb, values, dtype, saturate),
                                              emit_encode(bb, halves, dtype, saturate)]))
        bb.emit_func_output(out)
    del tvm
    return load_vm(build(bb.get(), TargetSpec(llvm_opt_level=0)))


def _probe_values(np_dtype, rng) -> np.ndarray:
    finite = np.sort(np.arange(256, dtype=np.uint8).view(np_dtype).astype(np.float32))
    finite = finite[np.isfinite(finite)]
    midpoints = (finite[:-1] + finite[1:]) / 2
    top = float(ml_dtypes.finfo(np_dtype).max)
    random = [rng.standard_normal(500).astype(np.float32) * scale for scale in (1e-4, 1e-3, 1e-2, 1, 1e2, 1e4)]
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, top * 1.03, top * 1.2, -top * 1.2, 1e30], np.float32)
    return np.concatenate([finite, midpoints, *random, specials]).astype(np.float32)


@pytest.mark.parametrize("dtype", FORMATS)
@pytest.mark.parametrize("saturate", [True, False])
def test_float8_codec_is_exact(dtype, saturate, rng):
    np_dtype = getattr(ml_dtypes, dtype)
    values = _probe_values(np_dtype, rng)
    halves = values.astype(np.float16)
    vm = _codec_module(dtype, saturate, len(values))
    codes = np.arange(256, dtype=np.uint8).view(np_dtype)
    decoded, decoded16, encoded, encoded16 = call_vm(vm, [codes, values, halves])

    reference = codes.astype(np.float32)
    assert _same_floats(decoded, reference)
    assert _same_floats(decoded16.astype(np.float32), reference.astype(np.float16).astype(np.float32))
    top = float(ml_dtypes.finfo(np_dtype).max)
    for got, source in ((encoded, values), (encoded16, halves.astype(np.float32))):
        want = (np.clip(source, -top, top) if saturate else source).astype(np_dtype)
        nan = np.isnan(want.astype(np.float32))
        assert np.array_equal(got.view(np.uint8)[~nan], want.view(np.uint8)[~nan])
        assert np.isnan(got.astype(np.float32)[nan]).all()


@pytest.mark.parametrize("dtype", FORMATS)
def test_float8_decode_through_hardware_half_is_exact(dtype):
    """decode_bits_via_half (the attention kernels' fp8 read on a CPU with F16C), vectorized as the kernels
    run it, for all 256 codes."""
    import tvm
    from tvm import te

    from kvc.compiler.tvm.kernels import float8
    from kvc.compiler.tvm.target import TargetSpec, converts_half_in_hardware, host_cpu

    target = TargetSpec(llvm_cpu=host_cpu()).tvm_target()
    if not converts_half_in_hardware(target):
        pytest.skip(f"this CPU ({host_cpu()}) has no F16C")
    codes = te.placeholder((256,), "uint8", name="codes")
    values = te.compute((256,), lambda i: float8.decode_bits_via_half(codes[i], float8.FORMATS[dtype]), name="values")
    sch = tvm.s_tir.Schedule(te.create_prim_func([codes, values]))
    outer, lanes = sch.split(sch.get_loops(sch.get_sblock("values"))[0], [None, 16])
    sch.vectorize(lanes)
    kernel = tvm.compile(sch.mod, target=target)
    out = tvm.runtime.tensor(np.zeros(256, np.float32))
    kernel(tvm.runtime.tensor(np.arange(256, dtype=np.uint8)), out)
    assert _same_floats(out.numpy(), np.arange(256, dtype=np.uint8).view(getattr(ml_dtypes, dtype)).astype(np.float32))


def _same_floats(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal including NaN positions and the sign of zero."""
    nan = np.isnan(a) | np.isnan(b)
    return bool(np.array_equal(np.isnan(a), np.isnan(b)) and np.array_equal(a[~nan], b[~nan])
                and np.array_equal(np.signbit(a[~nan]), np.signbit(b[~nan])))


# --- decode attention -----------------------------------------------------------------------------

CAPACITY = 40
LENGTHS = np.array([40, 17, 0, 33, 52], np.int64)  # full, partial chunk, empty, several chunks, past capacity


def _decode_module(spec, for_host_cpu: bool, capacity: int = CAPACITY):
    from kvc.compiler.tvm.kernels.decode_attention import emit_decode_attention
    from kvc.compiler.tvm.target import TargetSpec, build, converts_half_in_hardware, host_cpu

    target = TargetSpec(llvm_cpu=host_cpu() if for_host_cpu else None)
    spec = dataclasses.replace(spec, hardware_half=converts_half_in_hardware(target.tvm_target()))
    module = attention_module(spec, 1, lambda bb, *args: emit_decode_attention(bb, spec, *args), capacity)
    return load_vm(build(module, target))


def _quantize(x: np.ndarray, spec, rng):
    """(stored cache, scales or None, dequantized float64 values) for the spec's cache dtype."""
    from kvc.compiler.tvm.kernels.decode_attention import ScaleLayout

    if spec.cache_dtype in ("float32", "float16"):
        stored = x.astype(spec.cache_dtype)
        return stored, None, stored.astype(np.float64)
    qmax = 127.0 if spec.cache_dtype == "int8" else 448.0
    if spec.scale_layout is ScaleLayout.PER_TOKEN:
        scale = (np.abs(x).max(axis=-1, keepdims=True) / qmax).astype(np.float32)
        broadcast = scale
    else:
        scale = rng.uniform(0.005, 0.02, x.shape[1]).astype(np.float32)
        broadcast = scale[None, :, None, None]
    ratio = np.clip(x / broadcast, -qmax, qmax)
    stored = np.rint(ratio).astype(np.int8) if spec.cache_dtype == "int8" else ratio.astype(ml_dtypes.float8_e4m3fn)
    return stored, scale, stored.astype(np.float64) * broadcast


def _poison(stored: np.ndarray, scale, spec, lengths=LENGTHS) -> None:
    """NaN (or, for int8 codes, extreme values) in every slot at or past each sequence's length."""
    from kvc.compiler.tvm.kernels.decode_attention import ScaleLayout

    for b, length in enumerate(lengths):
        if stored.dtype == np.int8:
            stored[b, :, length:] = -128
        elif stored.dtype.itemsize == 1:
            stored.view(np.uint8)[b, :, length:] = 0x7F  # e4m3fn NaN
        else:
            stored[b, :, length:] = np.nan
        if spec.scale_layout.value == ScaleLayout.PER_TOKEN.value:
            scale[b, :, length:] = np.nan


def _reference(q, k, v, mask, spec, lengths=LENGTHS) -> np.ndarray:
    G = spec.num_heads // spec.num_kv_heads
    out = np.zeros(q.shape, np.float64)
    for b, length in enumerate(lengths):
        for h in range(spec.num_heads):
            scores = k[b, h // G, :length] @ q[b, h, 0].astype(np.float64) * spec.scale
            if mask is not None:
                scores = scores + mask[b, 0, 0, :length]
            if length == 0 or np.all(np.isneginf(scores)):
                continue  # no visible key: zeros
            p = np.exp(scores - scores.max())
            out[b, h, 0] = (p / p.sum()) @ v[b, h // G, :length]
    return out


def _specs():
    from kvc.compiler.tvm.kernels.decode_attention import DecodeAttentionSpec, ScaleLayout

    per_token, per_head = ScaleLayout.PER_TOKEN, ScaleLayout.PER_HEAD
    return {
        "fp32-gqa2-mask": DecodeAttentionSpec(4, 2, 16, has_mask=True, chunk_size=16),
        "fp32-mha-chunk7": DecodeAttentionSpec(2, 2, 8, chunk_size=7),
        # one part walks all 6 live chunks: the online softmax rescales across chunks
        "fp32-gqa2-mask-one-part": DecodeAttentionSpec(4, 2, 16, has_mask=True, chunk_size=7, splits=1),
        "fp16-gqa4": DecodeAttentionSpec(8, 2, 16, cache_dtype="float16", query_dtype="float16", chunk_size=8),
        "int8-per-token-mask": DecodeAttentionSpec(4, 2, 16, cache_dtype="int8", scale_layout=per_token,
                                                   has_mask=True, chunk_size=16),
        "fp8-per-head": DecodeAttentionSpec(4, 1, 32, cache_dtype="float8_e4m3fn", scale_layout=per_head,
                                            chunk_size=64, softmax_scale=0.3),
        "fp8-per-token": DecodeAttentionSpec(4, 2, 16, cache_dtype="float8_e4m3fn", scale_layout=per_token),
    }


@pytest.mark.parametrize("for_host_cpu", [False, True], ids=["generic-x86-64", "host-cpu"])
@pytest.mark.parametrize("name", list(_specs()))
def test_decode_attention_matches_numpy(name, for_host_cpu, rng):
    """Built for generic x86-64 (what a portable artifact gets) and for this machine's vector units."""
    spec = _specs()[name]
    got, want = _run_decode(spec, for_host_cpu, CAPACITY, LENGTHS, rng)
    atol = 2e-3 if spec.query_dtype == "float16" else 1e-5
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=0, atol=atol)


def _integer_specs():
    from kvc.compiler.tvm.kernels.decode_attention import DecodeAttentionSpec, ScaleLayout

    int8 = dict(cache_dtype="int8", avx512_int16=True, chunk_size=16)
    return {
        "per-token-mask-gqa3": DecodeAttentionSpec(6, 2, 32, scale_layout=ScaleLayout.PER_TOKEN, has_mask=True, **int8),
        "per-head-d64-one-part": DecodeAttentionSpec(4, 1, 64, scale_layout=ScaleLayout.PER_HEAD, splits=1, **int8),
        "per-token-d128-chunk32": DecodeAttentionSpec(2, 2, 128, scale_layout=ScaleLayout.PER_TOKEN,
                                                      **{**int8, "chunk_size": 32}),
    }


# odd capacity: a chunk's last slot pair reaches past the ring (its second slot is clamped and weighs 0)
INTEGER_CAPACITY = 41
INTEGER_LENGTHS = np.array([41, 17, 0, 33, 52, 1], np.int64)


@pytest.mark.parametrize("name", list(_integer_specs()))
def test_decode_attention_integer_dot_matches_numpy(name, rng):
    """int8 caches on AVX-512 BW: keys and values multiply as int16 (kernels.int16_dot). The int16 query and
    weights round to 2**-16 of each head's largest element: atol 1e-4 (the int8 codes themselves round
    at 4e-3 of each token's largest, so this is well inside a quantized cache's own error)."""
    from kvc.compiler.tvm.target import TargetSpec, has_avx512bw, host_cpu

    if not has_avx512bw(TargetSpec(llvm_cpu=host_cpu()).tvm_target()):
        pytest.skip("this CPU has no AVX-512 BW")
    spec = _integer_specs()[name]
    assert spec.integer_dot
    got, want = _run_decode(spec, True, INTEGER_CAPACITY, INTEGER_LENGTHS, rng)
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=0, atol=1e-4)


def test_decode_attention_integer_dot_only_where_it_applies():
    from kvc.compiler.tvm.kernels.decode_attention import DecodeAttentionSpec, ScaleLayout

    int8 = dict(cache_dtype="int8", scale_layout=ScaleLayout.PER_TOKEN, avx512_int16=True)
    assert DecodeAttentionSpec(4, 2, 64, **int8).integer_dot
    assert not DecodeAttentionSpec(4, 2, 64, **{**int8, "avx512_int16": False}).integer_dot
    assert not DecodeAttentionSpec(4, 2, 80, **int8).integer_dot  # head size not a multiple of 32
    assert not DecodeAttentionSpec(4, 2, 64, **int8, chunk_size=7).integer_dot
    assert not DecodeAttentionSpec(4, 2, 64, **int8, chunk_size=512).integer_dot  # int32 sums could overflow
    assert not DecodeAttentionSpec(4, 2, 64, cache_dtype="float8_e4m3fn", scale_layout=ScaleLayout.PER_TOKEN,
                                   avx512_int16=True).integer_dot


def _run_decode(spec, for_host_cpu: bool, capacity: int, lengths: np.ndarray, rng):
    """(kernel output, float64 reference) on random q / caches / mask, every slot past a length poisoned."""
    batch, K, D = len(lengths), spec.num_kv_heads, spec.head_dim
    q = rng.standard_normal((batch, spec.num_heads, 1, D)).astype(spec.query_dtype)
    k_stored, k_scale, k = _quantize(rng.standard_normal((batch, K, capacity, D)).astype(np.float32), spec, rng)
    v_stored, v_scale, v = _quantize(rng.standard_normal((batch, K, capacity, D)).astype(np.float32), spec, rng)
    mask = None
    if spec.has_mask:
        mask = rng.standard_normal((batch, 1, 1, capacity)).astype(np.float32)
        mask[0, 0, 0, [2, 5]] = -np.inf  # masked slots inside the valid range
        mask[3, 0, 0, :] = -np.inf  # a sequence that sees nothing: zeros
        for b, length in enumerate(lengths):
            mask[b, 0, 0, length:] = np.nan
    want = _reference(q, k, v, mask, spec, lengths)
    for stored, scale in ((k_stored, k_scale), (v_stored, v_scale)):
        _poison(stored, scale, spec, lengths)
    feeds = [q, k_stored, v_stored, lengths] + ([k_scale, v_scale] if k_scale is not None else [])
    feeds += [mask] if mask is not None else []
    (got,) = call_vm(_decode_module(spec, for_host_cpu, capacity), feeds)
    assert got.dtype == np.dtype(spec.query_dtype)
    return got, want


# --- prefill attention ----------------------------------------------------------------------------

def _prefill_module(spec):
    """Built for this CPU where the spec reads through hardware float16 conversion, else for generic x86-64."""
    import tvm

    from kvc.compiler.tvm.kernels.prefill_attention import emit_prefill_attention
    from kvc.compiler.tvm.target import TargetSpec, build, converts_half_in_hardware, host_cpu

    target = TargetSpec(llvm_cpu=host_cpu()) if spec.hardware_half else TargetSpec()
    if spec.hardware_half and not converts_half_in_hardware(target.tvm_target()):
        pytest.skip(f"this CPU ({host_cpu()}) has no F16C")
    seq = tvm.tirx.Var("seq", "int64")
    module = attention_module(spec, seq, lambda bb, *args: emit_prefill_attention(bb, spec, *args))
    return load_vm(build(module, target))


def attention_module(spec, seq, emit, capacity: int = CAPACITY):
    """Relax module `main`(q, k, v, lengths[, k_scale, v_scale][, mask]) returning
    ``emit(bb, q, k, v, lengths, k_scale, v_scale, mask)`` (absent inputs as None); seq: 1 or a Var."""
    import tvm
    from tvm import relax

    from kvc.compiler.tvm.kernels.kv_read import ScaleLayout

    H, K, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
    batch = tvm.tirx.Var("batch", "int64")
    q = relax.Var("q", relax.TensorType((batch, H, seq, D), spec.query_dtype))
    k = relax.Var("k", relax.TensorType((batch, K, capacity, D), spec.cache_dtype))
    v = relax.Var("v", relax.TensorType((batch, K, capacity, D), spec.cache_dtype))
    lengths = relax.Var("lengths", relax.TensorType((batch,), "int64"))
    params, scales, mask = [q, k, v, lengths], (None, None), None
    if spec.scale_layout is not ScaleLayout.NONE:
        shape = (batch, K, capacity, 1) if spec.scale_layout is ScaleLayout.PER_TOKEN else (K,)
        scales = tuple(relax.Var(n, relax.TensorType(shape, "float32")) for n in ("k_scale", "v_scale"))
        params += list(scales)
    if spec.has_mask:
        mask = relax.Var("mask", relax.TensorType((batch, 1, seq, capacity), "float32"))
        params.append(mask)
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(emit(bb, q, k, v, lengths, *scales, mask))
        bb.emit_func_output(out)
    return bb.get()


def _prefill_reference(q, k, v, mask, spec) -> np.ndarray:
    G, seq = spec.num_heads // spec.num_kv_heads, q.shape[2]
    out = np.zeros(q.shape, np.float64)
    for b, length in enumerate(LENGTHS):
        for h in range(spec.num_heads):
            for i in range(seq):
                visible = length if not spec.causal else max(0, min(length, length - seq + i + 1))
                scores = k[b, h // G, :visible] @ q[b, h, i].astype(np.float64) * spec.scale
                if mask is not None:
                    scores = scores + mask[b, 0, i, :visible]
                if visible == 0 or np.all(np.isneginf(scores)):
                    continue
                p = np.exp(scores - scores.max())
                out[b, h, i] = (p / p.sum()) @ v[b, h // G, :visible]
    return out


def _prefill_specs():
    from kvc.compiler.tvm.kernels.kv_read import ScaleLayout
    from kvc.compiler.tvm.kernels.prefill_attention import PrefillAttentionSpec

    return {
        "fp32-gqa2-mask": PrefillAttentionSpec(4, 2, 16, has_mask=True, query_tile=4, chunk_size=16),
        "fp32-causal-chunk7": PrefillAttentionSpec(2, 2, 8, causal=True, query_tile=3, chunk_size=7),
        "fp16-gqa4-causal": PrefillAttentionSpec(8, 2, 16, cache_dtype="float16", query_dtype="float16",
                                                 causal=True),
        "int8-per-token-mask": PrefillAttentionSpec(4, 2, 16, cache_dtype="int8", scale_layout=ScaleLayout.PER_TOKEN,
                                                    has_mask=True, causal=True, query_tile=8, chunk_size=16),
        "fp8-per-head": PrefillAttentionSpec(4, 1, 32, cache_dtype="float8_e4m3fn", scale_layout=ScaleLayout.PER_HEAD,
                                             softmax_scale=0.3, query_tile=5),
        "fp8-per-token-hardware-half": PrefillAttentionSpec(4, 2, 16, cache_dtype="float8_e4m3fn",
                                                            scale_layout=ScaleLayout.PER_TOKEN, causal=True,
                                                            hardware_half=True),
    }


@pytest.mark.parametrize("name", list(_prefill_specs()))
def test_prefill_attention_matches_numpy(name, rng):
    """Query counts 1, 9 and 17 through one build (symbolic seq): partial tiles, a single query."""
    spec = _prefill_specs()[name]
    batch, K, D = len(LENGTHS), spec.num_kv_heads, spec.head_dim
    vm = _prefill_module(spec)
    for seq in (1, 9, 17):
        q = rng.standard_normal((batch, spec.num_heads, seq, D)).astype(spec.query_dtype)
        k_stored, k_scale, k = _quantize(rng.standard_normal((batch, K, CAPACITY, D)).astype(np.float32), spec, rng)
        v_stored, v_scale, v = _quantize(rng.standard_normal((batch, K, CAPACITY, D)).astype(np.float32), spec, rng)
        mask = None
        if spec.has_mask:
            mask = rng.standard_normal((batch, 1, seq, CAPACITY)).astype(np.float32)
            mask[0, 0, :, [2, 5]] = -np.inf
            mask[3, 0, 0, :] = -np.inf  # one query that sees nothing: zeros
            for b, length in enumerate(LENGTHS):
                mask[b, 0, :, length:] = np.nan
        want = _prefill_reference(q, k, v, mask, spec)
        for stored, scale in ((k_stored, k_scale), (v_stored, v_scale)):
            _poison(stored, scale, spec)
        feeds = [q, k_stored, v_stored, LENGTHS] + ([k_scale, v_scale] if k_scale is not None else [])
        feeds += [mask] if mask is not None else []
        (got,) = call_vm(vm, feeds)
        atol = 2e-3 if spec.query_dtype == "float16" else 1e-5
        np.testing.assert_allclose(got.astype(np.float64), want, rtol=0, atol=atol, err_msg=f"seq={seq}")


def test_decode_attention_spec_rejects_inconsistent_settings():
    from kvc.compiler.tvm.kernels.decode_attention import DecodeAttentionSpec, ScaleLayout
    from kvc.errors import KvcError

    with pytest.raises(KvcError, match="not a multiple"):
        DecodeAttentionSpec(6, 4, 16)
    with pytest.raises(KvcError, match="needs scales"):
        DecodeAttentionSpec(4, 2, 16, cache_dtype="int8")
    with pytest.raises(KvcError, match="needs no scales"):
        DecodeAttentionSpec(4, 2, 16, scale_layout=ScaleLayout.PER_HEAD)


def test_fast_exp_matches_float64_exp_and_handles_infinities(rng):
    import tvm
    from tvm import te

    from kvc.compiler.tvm.kernels.fast_math import exp_f32

    x = np.concatenate([rng.uniform(-90, 89, 1 << 16).astype(np.float32),
                        np.array([-np.inf, np.inf, 0.0, -3.4e38, 88.0, -87.0], np.float32)])
    a = te.placeholder((x.size,), "float32", name="a")
    func = te.create_prim_func([a, te.compute(a.shape, lambda i: exp_f32(a[i]), name="e")])
    out = tvm.runtime.tensor(np.zeros_like(x))
    tvm.compile(func, target=tvm.target.Target({"kind": "llvm"}))(tvm.runtime.tensor(x), out)
    got, want = out.numpy().astype(np.float64), np.exp(x.astype(np.float64))
    normal = (x > -87.3) & (x < 88.3)
    assert np.max(np.abs(got[normal] - want[normal]) / want[normal]) < 2e-7
    assert np.all(got[x < -88.4] == 0)  # -inf included: masked scores weigh exactly nothing
    assert got[x == 0][0] == 1.0
    assert np.isfinite(got[x == np.inf][0]) and got[x == np.inf][0] > 1e38
