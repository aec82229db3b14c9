"""Exact float8 <-> float32 conversion as TIR expressions on the raw bits.

TVM 0.27's LLVM lowering of ``astype`` to and from float8 is wrong for zero, subnormals and NaN
(e.g. e4m3fn 0x00 decodes to 2^-7), and a KV cache is full of small values, so kvc converts itself:
  decode  shift the bits into a float32 and rebias its exponent (subnormals: one binade up, minus its start)
  encode  round to nearest even on the float32 bits (a carry out of the mantissa bumps the exponent,
          as it should), subnormals rounded as multiples of the smallest step; saturating or not.
Both are checked against ml_dtypes in tests/compiler/test_tvm_kernels.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from tvm import relax, te, tirx

FLOAT32_MANTISSA = 23
FLOAT32_BIAS = 127


@dataclass(frozen=True)
class Float8Format:
    dtype: str
    mantissa_bits: int
    exponent_bits: int
    bias: int
    max_code: int  # the largest finite magnitude's code (a saturating encode clamps there)
    nan_code: int  # the code encode writes for NaN
    overflow_code: int  # what a non-saturating encode writes past the largest finite value (inf or NaN)
    ieee_specials: bool  # all-ones exponent means inf/NaN (e5m2); else only mantissa all-ones is NaN (e4m3fn)

    @property
    def min_normal_exponent(self) -> int:
        return 1 - self.bias

    @property
    def subnormal_step(self) -> float:
        return 2.0 ** (1 - self.bias - self.mantissa_bits)


E4M3FN = Float8Format("float8_e4m3fn", mantissa_bits=3, exponent_bits=4, bias=7, max_code=0x7E, nan_code=0x7F,
                      overflow_code=0x7F, ieee_specials=False)
E5M2 = Float8Format("float8_e5m2", mantissa_bits=2, exponent_bits=5, bias=15, max_code=0x7B, nan_code=0x7F,
                    overflow_code=0x7C, ieee_specials=True)
FORMATS = {f.dtype: f for f in (E4M3FN, E5M2)}


def decode_bits(bits, fmt: Float8Format):
    """float32 value of an 8-bit code (any integer-typed PrimExpr), exactly, with integer operations and
    two selects that vectorize (attention kernels decode every cached element this way):
      normal     the magnitude bits shifted into a float32, exponent rebiased by adding (127 - bias) << 23;
      subnormal  rebiased one higher, the code reads 2^(1-bias) * (1 + m / 2^M); subtracting 2^(1-bias)
                 leaves m * 2^(1-bias-M) exactly (both terms are float32 numbers of one binade);
    the sign bit is set last (code 0x80 is -0.0); NaN / inf codes are selected at the end. No denormal
    float32 is ever formed (those cost microcode assists on some CPUs). Selects, not if_then_else: TVM's
    vectorizer scalarizes if_then_else (it must not evaluate the branch not taken), and these branches are
    plain arithmetic."""
    code = bits.astype("uint32")
    m_bits = fmt.mantissa_bits
    magnitude = code & tirx.const(0x7F, "uint32")
    subnormal = magnitude < tirx.const(1 << m_bits, "uint32")
    rebias = tirx.Select(subnormal, tirx.const((FLOAT32_BIAS - fmt.bias + 1) << FLOAT32_MANTISSA, "uint32"),
                         tirx.const((FLOAT32_BIAS - fmt.bias) << FLOAT32_MANTISSA, "uint32"))
    shifted = tirx.reinterpret("float32", (magnitude << (FLOAT32_MANTISSA - m_bits)) + rebias)
    offset = tirx.Select(subnormal, tirx.const(2.0 ** fmt.min_normal_exponent, "float32"), tirx.const(0.0, "float32"))
    unsigned = tirx.reinterpret("uint32", shifted - offset)
    value = tirx.reinterpret("float32", unsigned | ((code & tirx.const(0x80, "uint32")) << 24))
    exponent_ones = tirx.const(((1 << fmt.exponent_bits) - 1) << m_bits, "uint32")
    if fmt.ieee_specials:
        inf = tirx.Select(code > tirx.const(0x7F, "uint32"), tirx.const(float("-inf"), "float32"),
                          tirx.const(float("inf"), "float32"))
        special = tirx.Select(magnitude == exponent_ones, inf, tirx.const(float("nan"), "float32"))
        return tirx.Select(magnitude >= exponent_ones, special, value)
    nan_magnitude = tirx.const(0x7F, "uint32")  # exponent and mantissa all ones (e4m3fn has no inf)
    return tirx.Select(magnitude == nan_magnitude, tirx.const(float("nan"), "float32"), value)


def decode_bits_via_half(bits, fmt: Float8Format):
    """decode_bits for a CPU that converts float16 -> float32 in hardware (x86 F16C): the code's bits moved
    into a float16 (sign to bit 15, exponent and mantissa below it) are the value times 2^(bias - 15) for
    every code, subnormals included, since float16 has at least the format's exponent and mantissa bits;
    the conversion is exact and a multiply by 2^(15 - bias) rebiases. e5m2's inf/NaN land on float16's;
    e4m3fn's NaN (no inf) is selected. ~25% faster than decode_bits inside decode attention (its
    integer and select steps are the hot path of an fp8 cache), but one library call per element on a
    CPU without F16C, so only for targets that have it."""
    code = bits.astype("uint16")
    magnitude = code & tirx.const(0x7F, "uint16")
    half_bits = ((code & tirx.const(0x80, "uint16")) << 8) | (magnitude << (10 - fmt.mantissa_bits))
    value = tirx.reinterpret("float16", half_bits).astype("float32") * tirx.const(2.0 ** (15 - fmt.bias), "float32")
    if fmt.ieee_specials:
        return value
    return tirx.Select(magnitude == tirx.const(0x7F, "uint16"), tirx.const(float("nan"), "float32"), value)


def encode_bits(x, fmt: Float8Format, saturate: bool = True):
    """The uint8 code of a float32 PrimExpr, rounded to nearest even. Past the largest finite value:
    that value (saturate, ONNX's default) or inf / NaN (the format's overflow code)."""
    drop = FLOAT32_MANTISSA - fmt.mantissa_bits
    bits = tirx.reinterpret("uint32", x)
    sign = ((bits >> 31) << 7).astype("uint8")
    magnitude_bits = bits & tirx.const(0x7FFFFFFF, "uint32")
    magnitude = tirx.reinterpret("float32", magnitude_bits)
    half_minus_one = tirx.const((1 << (drop - 1)) - 1, "uint32")
    rounded = magnitude_bits + half_minus_one + ((magnitude_bits >> drop) & tirx.const(1, "uint32"))
    rebias = tirx.const((FLOAT32_BIAS - fmt.bias) << fmt.mantissa_bits, "uint32")
    normal = (rounded >> drop) - rebias
    min_normal = tirx.const(2.0 ** fmt.min_normal_exponent, "float32")
    subnormal = tirx.round(magnitude * tirx.const(1.0 / fmt.subnormal_step, "float32")).astype("uint32")
    max_code = tirx.const(fmt.max_code, "uint32")
    beyond = tirx.const(fmt.max_code if saturate else fmt.overflow_code, "uint32")
    huge = magnitude >= tirx.const(2.0 ** 24, "float32")  # also inf; keeps the unsigned subtraction in range
    overflow = tirx.any(huge, normal > max_code)
    code = tirx.if_then_else(magnitude < min_normal, subnormal, tirx.if_then_else(overflow, beyond, normal))
    code = tirx.if_then_else(tirx.isnan(x), tirx.const(fmt.nan_code, "uint32"), code)
    return sign | code.astype("uint8")


def emit_decode(bb: relax.BlockBuilder, x: relax.Expr, out_dtype: str = "float32") -> relax.Expr:
    """float8 tensor -> out_dtype tensor, exactly (via float32)."""
    fmt = FORMATS[str(x.ty.dtype)]

    def compute(data: te.Tensor):
        def value(*index):
            decoded = decode_bits(tirx.reinterpret("uint8", data[index]), fmt)
            return decoded if out_dtype == "float32" else decoded.astype(out_dtype)

        return te.compute(data.shape, value, name="fp8_decode")

    return bb.emit_te(compute, x, primfunc_name_hint=f"decode_{fmt.dtype}")


def emit_encode(bb: relax.BlockBuilder, x: relax.Expr, dtype: str, saturate: bool = True) -> relax.Expr:
    """float tensor -> float8 tensor, round to nearest even (see encode_bits for saturate)."""
    fmt = FORMATS[dtype]

    def compute(data: te.Tensor):
        def code(*index):
            value = data[index] if data.dtype == "float32" else data[index].astype("float32")
            return tirx.reinterpret(fmt.dtype, encode_bits(value, fmt, saturate))

        return te.compute(data.shape, code, name="fp8_encode")

    return bb.emit_te(compute, x, primfunc_name_hint=f"encode_{fmt.dtype}")
