"""The cpu backend's inference ops (crystal.generate): numba kernels over the KV cache.

Inference runs every op of the training forward that is row by row (the norms, products, GELU,
SwiGLU, residuals, the LM head) through the backend as training does; these are the four that
only inference has, because its rows sit at different positions of different sequences:

- `embed_at`: a token's embedding at its own position, pos[b] + t (wpe None, llama: the token's
  embedding alone);
- `rope_at` (llama): the rotary rotation of the q and k heads of token (b, t) by the angles of
  position pos[b] + t (the training op's rotation, at each sequence's own positions);
- `kv_attention`: the new tokens' keys and values are stored in the cache, then each query
  attends, causally, to every cached key of its sequence up to its own position; with
  n_kv_head < n_head (grouped-query attention), query head h reads KV head h // (NH / KV) of
  the cache in place (no copy per query head);
- `gather_rows`: one row per sequence (the last prompt token's) for the LM head;
- `copy_rows`: a cache row's keys or values copied into other rows (sequences that continue the
  same prompt share its prefill).

qkv rows are [q heads 0..NH-1 | k heads 0..KV-1 | v heads 0..KV-1], hd values each (GPT-2:
KV = NH, hd = C / NH). Cache layout: k and v are [B, KV, capacity, hd] per layer, so one head's
keys are a contiguous [positions, hd] matrix for BLAS. pos[b] = -1: sequence b sits out (every
op leaves its cache and rotation alone). The kernels are single-threaded (nogil); the products
call BLAS.

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

from crystal.backends.cpu import _heads, kernel, reduce_kernel
from crystal.backends.cpu_blas import gemm
from crystal.backends.cpu_math import fexp


@kernel
def embed_at(out, idx, wte, wpe, pos):
    # out[b,t] = wte[idx[b,t]] + wpe[pos[b] + t]  (pos[b] = -1: as 0); wpe None: wte[idx[b,t]]
    B, T = idx.shape
    C = wte.shape[1]
    for b in range(B):
        for t in range(T):
            ix, p = idx[b, t], max(pos[b], 0) + t  # pos -1: a row that sits out (position 0)
            if wpe is None:
                for c in range(C):
                    out[b, t, c] = wte[ix, c]
            else:
                for c in range(C):
                    out[b, t, c] = wte[ix, c] + wpe[p, c]


@kernel
def rope_at(qkv, cos, sin, pos, n_rot, hd):
    # qkv[B,T,R] in place: heads 0..n_rot-1 of row (b,t) (the q heads, then the k heads) rotate
    # by position p = pos[b] + t, as the training op rotates position t (crystal.backends.cpu):
    #   x1 = x[d], x2 = x[d + hd/2]:  x[d] = x1 cos[p,d] - x2 sin[p,d],  x[d + hd/2] = x2 cos + x1 sin
    # pos[b] = -1: row b sits out (untouched).
    B, T = qkv.shape[0], qkv.shape[1]
    half = hd // 2
    for b in range(B):
        if pos[b] < 0:
            continue
        for t in range(T):
            c, s = cos[pos[b] + t], sin[pos[b] + t]
            for j in range(n_rot):
                lo, hi = qkv[b, t, j * hd:j * hd + half], qkv[b, t, j * hd + half:(j + 1) * hd]
                for d in range(half):
                    x1, x2 = lo[d], hi[d]
                    lo[d] = x1 * c[d] - x2 * s[d]
                    hi[d] = x2 * c[d] + x1 * s[d]


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
def kv_attention(out, qkv, kc, vc, pos, B, T, NH, KV, hd, cap, scores):
    # Store: kc[b,kh,pos[b]+t] = k head kh of token (b,t), likewise v. Attend: for query head h of
    # (b,t) at position p = pos[b] + t, y = softmax(q K[0..p]^T / sqrt(hd)) V[0..p] with K, V the
    # cache of KV head h // (NH / KV) (GQA: read in place), head by head into out[b,t].
    # pos[b] = -1: row b sits out (nothing stored, out[b] = 0).
    # Flat buffers: qkv [B,T,(NH+2KV)hd], out [B,T,NH hd], kc/vc [B,KV,cap,hd]; scores: [T*cap] scratch.
    R, Q, g = (NH + 2 * KV) * hd, NH * hd, NH // KV
    scale = out.dtype.type(1.0 / math.sqrt(hd))
    for b in range(B):
        if pos[b] < 0:  # a row that sits out: its cache is left as it is, its output is 0
            out[b * T * Q:(b + 1) * T * Q] = 0.0
            continue
        for t in range(T):
            src = (b * T + t) * R
            for h in range(KV):
                dst = ((b * KV + h) * cap + pos[b] + t) * hd
                kc[dst:dst + hd] = qkv[src + Q + h * hd:src + Q + (h + 1) * hd]
                vc[dst:dst + hd] = qkv[src + Q + (KV + h) * hd:src + Q + (KV + h + 1) * hd]
    for b in range(B):
        if pos[b] < 0:
            continue
        L = pos[b] + T  # keys 0 .. L-1 are in the cache now
        for h in range(NH):
            q, y, kv = b * T * R + h * hd, b * T * Q + h * hd, (b * KV + h // g) * cap * hd
            gemm(False, True, T, L, hd, qkv, q, R, kc, kv, hd, 0.0, scores, 0, L)
            softmax_rows_upto(scores[:T * L], T, L, pos[b], scale)
            gemm(False, False, T, hd, L, scores, 0, L, vc, kv, hd, 0.0, out, y, Q)


DECODE_BLAS_THREADS = 1  # measured (see above); None: every core


@functools.lru_cache(maxsize=1)
def _controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()  # found once: entering a limit is then ~50 us, not ~0.5 ms


class CpuInferenceOps:
    """embed_at, rope_at, kv_attention, gather_rows and copy_rows on numpy arrays (crystal.generate's
    protocol)."""

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

    def rope_at(self, qkv, cos, sin, pos, n_head: int, n_kv_head: int) -> None:
        """qkv's q and k heads rotated in place, token (b, t) by position pos[b] + t (cos, sin:
        float32 [>= pos[b] + T, hd/2], the model's whole table; the kernel does not check bounds)."""
        NH, KV, hd = _heads(qkv, n_head, n_kv_head)
        T = qkv.shape[1]
        if cos.shape != sin.shape or cos.ndim != 2 or cos.shape[1] != hd // 2 or int(np.max(pos)) + T > cos.shape[0]:
            raise ValueError(f"rotary tables {cos.shape} do not cover positions up to {int(np.max(pos)) + T} "
                             f"of head size {hd}")
        rope_at(qkv, cos, sin, pos, NH + KV, hd)

    def kv_attention(self, out, qkv, k, v, pos, n_head: int, n_kv_head: int | None = None) -> None:
        """n_kv_head None: n_head (GPT-2). k, v: [B, KV, cap, hd]."""
        B, T = qkv.shape[:2]
        NH, KV, hd = _heads(qkv, n_head, n_kv_head)
        cap = k.shape[2]
        if k.shape[1] != KV or k.shape[3] != hd:
            raise ValueError(f"a cache of shape {k.shape} does not hold {KV} heads of size {hd}")
        if self._scores.size < T * cap or self._scores.dtype != qkv.dtype:  # [T, cap] scratch, grown once
            self._scores = np.empty(T * cap, dtype=qkv.dtype)
        kv_attention(out.reshape(-1), qkv.reshape(-1), k.reshape(-1), v.reshape(-1), pos, B, T, NH, KV, hd,
                     cap, self._scores)

    def gather_rows(self, out, x, rows) -> None:
        gather_rows(out, x, rows)

    def copy_rows(self, dst, src) -> None:
        """dst[...] = src, src [1, ...] broadcast over dst's rows (views of one layer's k or v)."""
        np.copyto(dst, src)
