"""The rotary table of a llama model: cos and sin [block_size, head_size / 2], float32.

Computed the way transformers' LlamaRotaryEmbedding computes it, in the same float32 steps:

    inv_freq[i] = 1 / theta^(2i / hd)                       i < hd/2, exponent 2i/hd in float32
    (llama3)     wavelen = 2 pi / inv_freq; low and high frequencies kept or divided by factor,
                 the band between them interpolated (transformers' _compute_llama3_parameters)
    freqs[t, i] = float32(t) * inv_freq[i]
    cos, sin    = cos(freqs), sin(freqs)

transformers concatenates [freqs | freqs] to hd columns; the rotary ops read the hd/2 distinct
ones (row t = position t). The power and the cosine/sine are evaluated in float64 and rounded
once to float32 (correctly rounded, the same on every machine); torch's float32 pow, cos and sin
are within an ulp of these, so the table agrees with transformers' to float32 rounding. The
model holds one device copy (crystal.model.Tensors) and slices its first T rows.
"""

from __future__ import annotations

import math

import numpy as np

from crystal.config import ModelConfig


def inv_freq(cfg: ModelConfig) -> np.ndarray:
    """float32 [hd/2]: the rotation frequencies (llama3-scaled when cfg.rope_scaling says so)."""
    hd = cfg.head_size
    exponent = np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)  # float32, as transformers'
    freq = (1.0 / np.power(np.float64(cfg.rope_theta), exponent.astype(np.float64))).astype(np.float32)
    if cfg.rope_scaling == "llama3":
        freq = _llama3(freq, cfg)
    return freq


def _llama3(freq: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Llama-3.1's frequency-dependent scaling, step for step as transformers' float32 tensors
    with Python scalars (a Python float meets a float32 array as a float32: numpy >= 2)."""
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old_context = cfg.rope_original_max_position
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = np.float32(2 * math.pi) / freq
    scaled = np.where(wavelen > np.float32(low_wavelen), freq / np.float32(factor), freq)
    smooth = (np.float32(old_context) / wavelen - np.float32(low)) / np.float32(high - low)
    smoothed = (np.float32(1) - smooth) * scaled / np.float32(factor) + smooth * scaled
    medium = ~(wavelen < np.float32(high_wavelen)) & ~(wavelen > np.float32(low_wavelen))
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_table(cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin), host float32 [block_size, hd/2]: row t rotates position t."""
    freqs = np.arange(cfg.block_size, dtype=np.float32)[:, None] * inv_freq(cfg)[None, :]  # float32 product
    f = freqs.astype(np.float64)
    return np.cos(f).astype(np.float32), np.sin(f).astype(np.float32)
