"""The cpu backend's inference ops (crystal.generate): numba kernels over the KV cache.

Inference runs every op of the training forward that is row by row (layernorm, products, GELU,
residuals, the LM head) through the backend as training does; these are the three that only
inference has, because its rows sit at different positions of different sequences:

- `embed_at`: a token's embedding at its own position, pos[b] + t;
- `kv_attention`: the new tokens' keys and values are stored in the cache, then each query
  attends, causally, to every cached key of its sequence up to its own position;
- `gather_rows`: one row per sequence (the last prompt token's) for the LM head.

Cache layout: k and v are [B, NH, capacity, hs] per layer, so one head's keys are a contiguous
[positions, hs] matrix for BLAS. The kernels are single-threaded (nogil); the products call BLAS.

BLAS threads (`threads`): a decode step's products have as many rows as sequences, so they are
small, memory-bound and dominated by the threads' hand-offs: measured on the 2-core VM
(bench/bench_generate.py --blas-threads-check, bench/RESULTS.md), one BLAS thread decodes GPT-2
124M at batch 1 faster than two. A prefill (rows = prompt tokens) is compute-bound and uses every
core the process may use.
"""

from __future__ import annotations

import contextlib
import functools
import math

import numpy as np

from crystal.backends.cpu import kernel, reduce_kernel
from crystal.backends.cpu_blas import gemm
from crystal.backends.cpu_math import fexp


@kernel
def embed_at(out, idx, wte, wpe, pos):
    # out[b,t] = wte[idx[b,t]] + wpe[pos[b] + t]  (pos[b] = -1: as 0)
    B, T = idx.shape
    C = wte.shape[1]
    for b in range(B):
        for t in range(T):
            ix, p = idx[b, t], max(pos[b], 0) + t  # pos -1: a row that sits out (position 0)
            for c in range(C):
                out[b, t, c] = wte[ix, c] + wpe[p, c]


@kernel
def gather_rows(out, x, rows):
    # out[b] = x[b, rows[b]] for x [B,T,C]
    for b in range(out.shape[0]):
        out[b, :] = x[b, rows[b], :]


@reduce_kernel
def softmax_rows_upto(s, T, L, first, scale):
    # rows t of s[T*L] in place: p = exp(scale (s - max)) / sum over columns <= first + t, 0 after
    for t in range(T):
        row = s[t * L:(t + 1) * L]
        n = min(first + t + 1, L)
        maxv = row[0]
        for j in range(1, n):
            maxv = max(maxv, row[j])
        total = 0.0
        for j in range(n):
            e = fexp((row[j] - maxv) * scale)
            row[j] = e
            total += e
        inv = s.dtype.type(1.0 / total)
        for j in range(n):
            row[j] *= inv
        for j in range(n, L):
            row[j] = 0.0


@kernel
def kv_attention(out, qkv, kc, vc, pos, B, T, C, NH, cap, scores):
    # Store: kc[b,h,pos[b]+t] = k of token (b,t), likewise v. Attend: for query (b,t) at position
    # p = pos[b] + t, y = softmax(q K[0..p]^T / sqrt(hs)) V[0..p], head by head into out[b,t].
    # pos[b] = -1: row b sits out (nothing stored, out[b] = 0).
    # Flat buffers: qkv [B,T,3C], out [B,T,C], kc/vc [B,NH,cap,hs]; scores: [T*cap] scratch.
    hs = C // NH
    scale = out.dtype.type(1.0 / math.sqrt(hs))
    for b in range(B):
        if pos[b] < 0:  # a row that sits out: its cache is left as it is, its output is 0
            out[b * T * C:(b + 1) * T * C] = 0.0
            continue
        for t in range(T):
            src = (b * T + t) * 3 * C
            for h in range(NH):
                dst = ((b * NH + h) * cap + pos[b] + t) * hs
                kc[dst:dst + hs] = qkv[src + C + h * hs:src + C + (h + 1) * hs]
                vc[dst:dst + hs] = qkv[src + 2 * C + h * hs:src + 2 * C + (h + 1) * hs]
    for b in range(B):
        if pos[b] < 0:
            continue
        L = pos[b] + T  # keys 0 .. L-1 are in the cache now
        for h in range(NH):
            q, y, kv = b * T * 3 * C + h * hs, b * T * C + h * hs, (b * NH + h) * cap * hs
            gemm(False, True, T, L, hs, qkv, q, 3 * C, kc, kv, hs, 0.0, scores, 0, L)
            softmax_rows_upto(scores[:T * L], T, L, pos[b], scale)
            gemm(False, False, T, hs, L, scores, 0, L, vc, kv, hs, 0.0, out, y, C)


DECODE_BLAS_THREADS = 1  # measured (see above); None: every core


@functools.lru_cache(maxsize=1)
def _controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()  # found once: entering a limit is then ~50 us, not ~0.5 ms


class CpuInferenceOps:
    """embed_at, kv_attention and gather_rows on numpy arrays (crystal.generate's protocol)."""

    def threads(self, decode: bool):
        """The BLAS thread limit of a decode step (DECODE_BLAS_THREADS) or a prefill (none)."""
        if not decode or DECODE_BLAS_THREADS is None:
            return contextlib.nullcontext()
        return _controller().limit(limits=DECODE_BLAS_THREADS, user_api="blas")

    def __init__(self, be):
        self.be = be
        self._scores = np.empty(0, dtype=np.float32)

    def embed_at(self, out, idx, wte, wpe, pos) -> None:
        embed_at(out, idx, wte, wpe, pos)

    def kv_attention(self, out, qkv, k, v, pos, n_head: int) -> None:
        B, T, C3 = qkv.shape
        cap = k.shape[2]
        if self._scores.size < T * cap or self._scores.dtype != qkv.dtype:  # [T, cap] scratch, grown once
            self._scores = np.empty(T * cap, dtype=qkv.dtype)
        kv_attention(out.reshape(-1), qkv.reshape(-1), k.reshape(-1), v.reshape(-1), pos, B, T, C3 // 3,
                     n_head, cap, self._scores)

    def gather_rows(self, out, x, rows) -> None:
        gather_rows(out, x, rows)
