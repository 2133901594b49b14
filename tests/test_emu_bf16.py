"""The emulator's bfloat16 (tests/emu/emu.h, used through kernels/bf16.cuh's load/store) rounds
exactly as CUDA's __float2bfloat16_rn / cvt.rn.bf16.f32: to nearest even, overflow to inf, every
NaN to the canonical 0x7FFF; and widens exactly.

The reference is ml_dtypes' bfloat16 (round to nearest even) for every non-NaN float; ml_dtypes
keeps NaN payloads, CUDA does not, so NaNs are checked against 0x7FFF.
"""

from __future__ import annotations

import ctypes

import ml_dtypes
import numpy as np
import pytest

from emu.build import build_source

WRAPPER = r"""
#include "bf16.cuh"
// out[i] = bits of bf16(in[i]), through the kernels' store()
extern "C" void round_to_bf16(unsigned short* out, const float* in, long long n) {
  for (long long i = 0; i < n; ++i) {
    bf16 h;
    store(&h, in[i]);
    out[i] = h.bits;
  }
}
// out[i] = float of the bf16 with bits in[i], through the kernels' load()
extern "C" void widen_bf16(float* out, const unsigned short* in, long long n) {
  for (long long i = 0; i < n; ++i) {
    bf16 h{in[i]};
    out[i] = load(&h);
  }
}
"""

CANONICAL_NAN = 0x7FFF


@pytest.fixture(scope="module")
def lib():
    lib = build_source(WRAPPER, "bf16_wrapper")
    for fn in (lib.round_to_bf16, lib.widen_bf16):
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong]
        fn.restype = None
    return lib


def emu_round(lib, bits32) -> np.ndarray:
    """Bits of f32_to_bf16 for each float32 given by its bits."""
    x = np.ascontiguousarray(bits32, np.uint32).view(np.float32)
    out = np.empty(x.size, np.uint16)
    lib.round_to_bf16(out.ctypes.data, x.ctypes.data, x.size)
    return out


def reference_round(bits32) -> np.ndarray:
    """ml_dtypes' round to nearest even; 0x7FFF for every NaN (CUDA's canonical NaN)."""
    x = np.asarray(bits32, np.uint32).view(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        ref = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    return np.where(np.isnan(x), np.uint16(CANONICAL_NAN), ref)


def f32_bits(*values) -> np.ndarray:
    return np.array(values, np.float32).view(np.uint32)


# (float32 bits, expected bf16 bits): the rounding's edge cases, by hand
EDGE_CASES = [
    (0x3F808000, 0x3F80),  # 1 + 2^-8: an exact tie, kept lsb even -> down
    (0x3F818000, 0x3F82),  # tie with odd kept lsb -> up to even
    (0xBF808000, 0xBF80),  # negative ties round the magnitude the same way
    (0xBF818000, 0xBF82),
    (0x3F807FFF, 0x3F80),  # just below a tie -> down
    (0x3F808001, 0x3F81),  # just above a tie -> up
    (0x3F80FFFF, 0x3F81),  # just below the next bf16 -> up
    (0x3FFF8000, 0x4000),  # a tie whose carry moves the exponent
    (0x7F7FFFFF, 0x7F80),  # max finite float32 -> +inf
    (0xFF7FFFFF, 0xFF80),  # and -inf
    (0x7F7F0000, 0x7F7F),  # the largest finite bf16 stays
    (0x7F7F7FFF, 0x7F7F),  # just below the tie above it: still finite
    (0x7F7F8000, 0x7F80),  # the tie above it (odd lsb): up to inf
    (0x00000001, 0x0000),  # the smallest float32 subnormal -> +0
    (0x80000001, 0x8000),  # -> -0
    (0x00008000, 0x0000),  # a subnormal tie, even -> down
    (0x00018000, 0x0002),  # a subnormal tie, odd -> up
    (0x00010000, 0x0001),  # the smallest bf16 subnormal stays
    (0x007FFFFF, 0x0080),  # the largest float32 subnormal -> the smallest normal
    (0x807FFFFF, 0x8080),
    (0x00000000, 0x0000),  # +0
    (0x80000000, 0x8000),  # -0
    (0x7F800000, 0x7F80),  # +inf
    (0xFF800000, 0xFF80),  # -inf
]

NANS = [
    0x7FC00000,  # quiet
    0xFFC00000,  # negative quiet
    0x7F800001,  # signalling, the smallest payload (truncation would give inf)
    0x7F80FFFF,  # payload in the dropped bits only
    0xFF800001,  # negative signalling
    0x7FA12345,  # signalling with a payload
    0x7FFFFFFF,  # all ones (rounding up would overflow the sign)
    0xFFFFFFFF,
    0x7FC0DEAD,  # quiet with a payload
]


def test_emu_f32_to_bf16_edge_cases_match_by_hand_and_ml_dtypes(lib):
    bits = np.array([b for b, _ in EDGE_CASES], np.uint32)
    expected = np.array([e for _, e in EDGE_CASES], np.uint16)
    got = emu_round(lib, bits)
    for b, g, e in zip(bits, got, expected):
        assert g == e, f"f32 {b:#010x}: got {g:#06x}, want {e:#06x}"
    np.testing.assert_array_equal(got, reference_round(bits))


def test_emu_f32_to_bf16_every_nan_is_canonical(lib):
    got = emu_round(lib, np.array(NANS, np.uint32))
    assert [hex(g) for g in got] == [hex(CANONICAL_NAN)] * len(NANS)


def test_emu_f32_to_bf16_random_floats_match_ml_dtypes(lib):
    rng = np.random.default_rng(20240601)
    patterns = rng.integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32)  # all kinds
    normal = rng.standard_normal(50_000).astype(np.float32) * np.float32(1e3)
    tiny = (rng.standard_normal(20_000) * 1e-39).astype(np.float32)  # subnormals
    upper = (np.uint32(0x7F7F0000) | rng.integers(0, 2**16, 10_000).astype(np.uint32))  # near max
    ties = (rng.integers(0, 2**16, 20_000).astype(np.uint32) << 16) | np.uint32(0x8000)
    bits = np.concatenate([patterns, normal.view(np.uint32), tiny.view(np.uint32), upper, ties,
                           upper | np.uint32(0x80000000)])
    got, want = emu_round(lib, bits), reference_round(bits)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, [(hex(bits[i]), hex(got[i]), hex(want[i])) for i in bad[:10]]
    assert np.isnan(bits.view(np.float32)).any() and (np.abs(bits.view(np.float32)) < 1.2e-38).any()


def test_emu_bf16_to_f32_is_exact_for_all_65536_patterns(lib):
    h = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    out = np.empty(h.size, np.float32)
    lib.widen_bf16(out.ctypes.data, h.ctypes.data, h.size)
    np.testing.assert_array_equal(out.view(np.uint32), h.astype(np.uint32) << 16)  # bits << 16
    ref = h.view(ml_dtypes.bfloat16).astype(np.float32)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(out), nan) and nan.sum() == 2 * 127  # NaN stays NaN
    np.testing.assert_array_equal(out[~nan], ref[~nan])
    # and back: every non-NaN bf16 is a float that rounds to itself
    np.testing.assert_array_equal(emu_round(lib, out.view(np.uint32)),
                                  np.where(nan, np.uint16(CANONICAL_NAN), h))
