"""exp and tanh for numba kernels that LLVM can vectorize (float32), exact libm for float64.

numba calls libm's scalar expf/tanhf, which no loop vectorizer can widen; these are written in
plain float32 arithmetic instead (Cephes' expf and tanhf: range reduction, a polynomial, and
2^n built from its exponent bits), so a softmax or GELU loop runs in SIMD registers inside one
kernel. Accuracy: within 2 ulp of the correctly rounded result. float64 arrays (the
finite-difference tests) get math.exp / math.tanh through the same names.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload, register_jitable

F = np.float32
LOG2E, LN2_HI, LN2_LO = F(1.4426950408889634), F(0.693359375), F(-2.12194440e-4)
E0, E1, E2, E3, E4, E5 = (F(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3,
                                         4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1))
EXP_LO, EXP_HI = F(-87.33654), F(88.37626)  # below: 0 (no denormals); above: inf (0.35 early)
T0, T1, T2, T3, T4 = (F(c) for c in (-5.70498872745e-3, 2.06390887954e-2, -5.37397155531e-2,
                                     1.33314422036e-1, -3.33332819422e-1))
TANH_SMALL = F(0.625)
ZERO, HALF, ONE, TWO = F(0), F(0.5), F(1), F(2)


@intrinsic
def _bits_to_float32(typingctx, bits):
    """The float32 whose IEEE bits are the int32 `bits` (a register bitcast)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@register_jitable(inline="always")
def exp32(x):
    # exp(x) = 2^n exp(r), n = round(x / ln 2), |r| <= ln2 / 2; exp(r) by a degree-7 polynomial
    y = min(max(x, EXP_LO), EXP_HI)
    n = np.floor(y * LOG2E + HALF)
    r = (y - n * LN2_HI) - n * LN2_LO
    p = ((((E0 * r + E1) * r + E2) * r + E3) * r + E4) * r + E5
    e = (p * r * r + r + ONE) * _bits_to_float32((np.int32(n) + np.int32(127)) << np.int32(23))
    if x > EXP_HI:
        return F(np.inf)
    if x < EXP_LO:
        return ZERO
    return e  # and NaN stays NaN: both tests above are false for it


@register_jitable(inline="always")
def tanh32(x):
    # |x| < 0.625: x + x^3 P(x^2); else 1 - 2 / (exp(2|x|) + 1), with the sign of x
    a = abs(x)
    z = x * x
    p = (((T0 * z + T1) * z + T2) * z + T3) * z + T4
    small = p * z * x + x
    large = ONE - TWO / (exp32(TWO * a) + ONE)
    return small if a < TANH_SMALL else math.copysign(large, x)


def fexp(x):
    """exp(x): exp32 for float32, math.exp for float64 (numba kernels only)."""
    raise NotImplementedError


def ftanh(x):
    """tanh(x): tanh32 for float32, math.tanh for float64 (numba kernels only)."""
    raise NotImplementedError


@overload(fexp, inline="always")
def _fexp(x):
    if x == types.float32:
        return lambda x: exp32(x)
    return lambda x: math.exp(x)


@overload(ftanh, inline="always")
def _ftanh(x):
    if x == types.float32:
        return lambda x: tanh32(x)
    return lambda x: math.tanh(x)
