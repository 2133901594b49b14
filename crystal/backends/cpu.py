"""CPU backend: numba kernels (nogil, so sphere threads run them in parallel) calling BLAS.

Each op is a forward/backward pair of `@kernel` functions, side by side, in llm.c's style, and
each backend op is one kernel call: its matrix products call NumPy's BLAS from inside the
kernel (`cpu_blas.gemm`), so a sphere takes the GIL once per op, not once per product, and the
threads rarely wait on each other. The kernels are dtype-generic (the tests run them in
float64 for finite differences) and single-threaded: parallelism comes from the spheres, one
thread each, with BLAS limited to one thread per caller (see `blas_threads`). Reductions
accumulate in float64 in an order fixed by the compiled code (row sums are `@reduce_kernel`s,
vectorized by reassociation), so every op is bitwise reproducible for the same inputs on a
machine. exp and tanh are `cpu_math`'s float32 versions, which vectorize inside the loops.
Buffers are C-contiguous (the backend allocates them so): BLAS calls address them by element
offsets and leading dimensions, loops by slices.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading

import numpy as np
from numba import njit

from crystal.backends.base import vocab_columns
from crystal.backends.cpu_blas import gemm
from crystal.backends.cpu_math import fexp, ftanh
from crystal.dropout import GOLDEN, MIX1, MIX2

kernel = njit(nogil=True, cache=True, error_model="numpy")
# For row reductions: lets LLVM reassociate sums so they vectorize (the order is still fixed by
# the compiled code, so results stay bitwise reproducible on a machine; NaN/inf semantics kept).
reduce_kernel = njit(nogil=True, cache=True, error_model="numpy", fastmath={"reassoc", "contract"})

GELU_SCALE = math.sqrt(2.0 / math.pi)
# float32 constants keep the pointwise kernels in float32, so LLVM vectorizes them
GELU_S32, GELU_A32, GELU_3A32 = np.float32(GELU_SCALE), np.float32(0.044715), np.float32(3 * 0.044715)
HALF32, ONE32 = np.float32(0.5), np.float32(1.0)


# --- encoder: out[b,t] = wte[idx[b,t]] + wpe[t] (wpe None: no position embeddings, Llama) -----

@kernel
def encoder_forward(out, idx, wte, wpe):
    B, T = idx.shape
    C = wte.shape[1]
    for b in range(B):
        for t in range(T):
            ix = idx[b, t]
            if wpe is None:
                for c in range(C):
                    out[b, t, c] = wte[ix, c]
            else:
                for c in range(C):
                    out[b, t, c] = wte[ix, c] + wpe[t, c]


@kernel
def encoder_backward(dwte, dwpe, dout, idx):
    # dwpe (unless None) is written (all rows: positions >= T get zero); dwte accumulates rows
    # in (b, t) order, a fixed order as in llm.c.
    B, T = idx.shape
    C = dwte.shape[1]
    if dwpe is not None:
        for t in range(dwpe.shape[0]):
            for c in range(C):
                dwpe[t, c] = 0.0
    for b in range(B):
        for t in range(T):
            ix = idx[b, t]
            for c in range(C):
                dwte[ix, c] += dout[b, t, c]
            if dwpe is not None:
                for c in range(C):
                    dwpe[t, c] += dout[b, t, c]


# --- layernorm over the last axis of inp[N,C] ------------------------------------------------

@reduce_kernel
def layernorm_forward(out, mean, rstd, inp, w, b, eps):
    N, C = inp.shape
    for i in range(N):
        m = 0.0
        for c in range(C):
            m += inp[i, c]
        m /= C
        var = 0.0
        for c in range(C):
            d = inp[i, c] - m
            var += d * d
        var /= C
        s = 1.0 / math.sqrt(var + eps)
        for c in range(C):
            out[i, c] = (inp[i, c] - m) * s * w[c] + b[c]
        mean[i] = m
        rstd[i] = s


@reduce_kernel
def layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd):
    # dnorm = w * dout;  dinp += rstd * (dnorm - mean(dnorm) - norm * mean(dnorm * norm))
    # dw, db: None for a frozen LayerNorm (LoRA): only dinp is computed
    N, C = inp.shape
    if dw is not None:
        for c in range(C):
            dw[c] = 0.0
            db[c] = 0.0
    for i in range(N):
        m = mean[i]
        s = rstd[i]
        dnorm_mean = 0.0
        dnorm_norm_mean = 0.0
        for c in range(C):
            norm = (inp[i, c] - m) * s
            dnorm = w[c] * dout[i, c]
            dnorm_mean += dnorm
            dnorm_norm_mean += dnorm * norm
        dnorm_mean /= C
        dnorm_norm_mean /= C
        for c in range(C):
            norm = (inp[i, c] - m) * s
            dnorm = w[c] * dout[i, c]
            if dw is not None:
                db[c] += dout[i, c]
                dw[c] += norm * dout[i, c]
            dinp[i, c] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * s


# --- RMSNorm over the last axis of inp[N,C] (Llama): out = w * x * rstd, rstd = 1 / sqrt(mean(x^2) + eps) ---

@reduce_kernel
def rmsnorm_forward(out, rstd, inp, w, eps):
    # the sum of squares in float64; rstd rounded once to its dtype (float32), then
    # out = (x rstd) w in the activations' dtype, as transformers' LlamaRMSNorm computes it
    N, C = inp.shape
    for i in range(N):
        x = inp[i]
        ss = 0.0
        for c in range(C):
            xc = np.float64(x[c])
            ss += xc * xc
        r = rstd.dtype.type(1.0 / math.sqrt(ss / C + eps))
        rstd[i] = r
        o = out[i]
        for c in range(C):
            o[c] = (x[c] * r) * w[c]


@reduce_kernel
def rmsnorm_backward(dinp, dw, dout, inp, w, rstd):
    # xhat = x rstd, dxhat = dout w:  dinp += rstd (dxhat - xhat mean(dxhat xhat));
    # dw = sum over rows of dout xhat (written; rows in order, accumulated in float64; None: a
    # frozen RMSNorm (LoRA), dinp alone)
    N, C = inp.shape
    acc = np.zeros(C, np.float64)
    for i in range(N):
        x, d, di = inp[i], dout[i], dinp[i]
        r = rstd[i]
        dot = 0.0
        for c in range(C):
            dot += np.float64(d[c] * w[c]) * np.float64(x[c] * r)
        dot /= C
        for c in range(C):
            xhat = x[c] * r
            acc[c] += np.float64(d[c] * xhat)
            di[c] += r * (d[c] * w[c] - xhat * dot)
    if dw is not None:
        for c in range(C):
            dw[c] = acc[c]


# --- rotary position embeddings (Hugging Face's rotate-half layout), in place on qkv rows ------
# x[N,R] rows of qkv[B,T,R] (row i at position t = i % T); heads 0..n_rot-1 of each row (the NH
# q heads then the KV k heads, contiguous) rotate, v heads stay. cos, sin: [>= T, hd/2].

@kernel
def rope_forward(x, cos, sin, T, n_rot, hd):
    # x1 = x[d], x2 = x[d + hd/2]:  x[d] = x1 cos - x2 sin,  x[d + hd/2] = x2 cos + x1 sin
    half = hd // 2
    for i in range(x.shape[0]):
        c, s = cos[i % T], sin[i % T]
        for j in range(n_rot):
            lo, hi = x[i, j * hd:j * hd + half], x[i, j * hd + half:(j + 1) * hd]
            for d in range(half):
                x1, x2 = lo[d], hi[d]
                lo[d] = x1 * c[d] - x2 * s[d]
                hi[d] = x2 * c[d] + x1 * s[d]


@kernel
def rope_backward(dx, cos, sin, T, n_rot, hd):
    # the transpose of the rotation:  dx1 = dy1 cos + dy2 sin,  dx2 = dy2 cos - dy1 sin
    half = hd // 2
    for i in range(dx.shape[0]):
        c, s = cos[i % T], sin[i % T]
        for j in range(n_rot):
            lo, hi = dx[i, j * hd:j * hd + half], dx[i, j * hd + half:(j + 1) * hd]
            for d in range(half):
                dy1, dy2 = lo[d], hi[d]
                lo[d] = dy1 * c[d] + dy2 * s[d]
                hi[d] = dy2 * c[d] - dy1 * s[d]


# --- matmul: out[N,OC] = inp[N,C] @ w[C,OC] + bias, the product by BLAS inside the kernel ------

@kernel
def bias_forward(out, bias):
    N, OC = out.shape
    for i in range(N):
        for o in range(OC):
            out[i, o] += bias[o]


@kernel
def bias_backward(dbias, dout):
    # dbias[o] = sum over rows of dout[:, o], rows in order
    N, OC = dout.shape
    for o in range(OC):
        dbias[o] = 0.0
    for i in range(N):
        for o in range(OC):
            dbias[o] += dout[i, o]


@kernel
def matmul_forward(out, inp, w, bias):
    N, C = inp.shape
    OC = w.shape[1]
    gemm(False, False, N, OC, C, inp, 0, C, w, 0, OC, 0.0, out, 0, OC)
    if bias is not None:
        bias_forward(out, bias)


@kernel
def matmul_backward(dinp, dw, dbias, dout, inp, w):
    # dinp = dout w^T;  dw = inp^T dout;  dbias = column sums of dout (dw, dbias may be None)
    N, C = inp.shape
    OC = w.shape[1]
    gemm(False, True, N, C, OC, dout, 0, OC, w, 0, OC, 0.0, dinp, 0, C)
    if dw is not None:  # None: a frozen weight (LoRA), no weight product
        gemm(True, False, C, OC, N, inp, 0, C, dout, 0, OC, 0.0, dw, 0, OC)
    if dbias is not None:
        bias_backward(dbias, dout)


# --- a product into (or from) a column block [lo, lo+OC) of a wider [N,W] output: LoRA's B on a
# part of a fused product (a llama's q, k, v of q|k|v, gate, up of gate|up), read in place -------

@kernel
def matmul_columns_forward(out, inp, w, lo):
    # out[:, lo:lo+OC] += inp[N,C] @ w[C,OC]  (out [N,W]: leading dimension W)
    N, C = inp.shape
    OC, W = w.shape[1], out.shape[1]
    gemm(False, False, N, OC, C, inp, 0, C, w, 0, OC, 1.0, out, lo, W)


@kernel
def matmul_columns_backward(dinp, dw, dout, inp, w, lo):
    # d = dout[:, lo:lo+OC] (of dout [N,W]):  dinp = d w^T;  dw = inp^T d  (both written)
    N, C = inp.shape
    OC, W = w.shape[1], dout.shape[1]
    gemm(False, True, N, C, OC, dout, lo, W, w, 0, OC, 0.0, dinp, 0, C)
    gemm(True, False, C, OC, N, inp, 0, C, dout, lo, W, 0.0, dw, 0, OC)


# --- linear, nn.Linear layout w[OC,C]: out[N,OC] = inp[N,C] @ w^T + bias (Llama's weights) ------

@kernel
def linear_forward(out, inp, w, bias):
    N, C = inp.shape
    OC = w.shape[0]
    gemm(False, True, N, OC, C, inp, 0, C, w, 0, C, 0.0, out, 0, OC)
    if bias is not None:
        bias_forward(out, bias)


@kernel
def linear_backward(dinp, dw, dbias, dout, inp, w):
    # dinp = dout w;  dw = dout^T inp;  dbias = column sums of dout (all written; dw, dbias may be None)
    N, C = inp.shape
    OC = w.shape[0]
    gemm(False, False, N, C, OC, dout, 0, OC, w, 0, C, 0.0, dinp, 0, C)
    if dw is not None:  # None: a frozen weight (LoRA), no weight product
        gemm(True, False, OC, C, N, dout, 0, OC, inp, 0, C, 0.0, dw, 0, C)
    if dbias is not None:
        bias_backward(dbias, dout)


# --- the LM head, tied to wte[V,C]: logits = inp wte^T, a linear product without bias ---------

@kernel
def lm_head_forward(logits, inp, wte):
    linear_forward(logits, inp, wte, None)


@kernel
def lm_head_backward(dinp, dwte, dlogits, inp, wte):
    # dinp = dlogits wte;  dwte = dlogits^T inp (written)
    linear_backward(dinp, dwte, None, dlogits, inp, wte)


# --- dropout: out = inp * keep(key, i) * scale, the mask hash of crystal.dropout --------------

U30, U27, U31, U32 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(32)
GOLDEN_U64, MIX1_U64, MIX2_U64 = np.uint64(GOLDEN), np.uint64(MIX1), np.uint64(MIX2)


@kernel
def kept(key, i, threshold):
    # splitmix64 of (key, element i): kept when its high 32 bits reach the threshold
    z = key + np.uint64(i + 1) * GOLDEN_U64
    z = (z ^ (z >> U30)) * MIX1_U64
    z = (z ^ (z >> U27)) * MIX2_U64
    z ^= z >> U31
    return (z >> U32) >= threshold


@kernel
def dropout_range(out, inp, first, key, threshold, scale):
    # out[j] = inp[j] * scale if element first + j is kept, else 0 (out may be inp)
    for j in range(out.size):
        if kept(key, first + j, threshold):
            out[j] = inp[j] * scale
        else:
            out[j] = 0


@kernel
def dropout(out, inp, key, threshold, scale):
    # one op for both passes: the backward applies the forward's mask to the gradient
    dropout_range(out, inp, 0, key, threshold, scale)


# --- causal self-attention, one kernel per pass, per (batch, query head) ---------------------
# Flat buffers: qkv[B,T,R], R = (NH + 2 KV) hd: q heads 0..NH-1 | k heads 0..KV-1 | v heads
# 0..KV-1, head j at channels j*hd of its block (GPT-2: KV = NH, R = 3C). Query head h reads KV
# head h // g, g = NH // KV (grouped-query attention; K and V are read in place, never copied
# per query head). out[B,T,NH*hd] (head h at channels h*hd), att[B,NH,T,T] (the softmax
# probabilities: row t covers t2 <= t, zeros after). The products go to BLAS on the heads'
# strided rows (leading dimension R or NH*hd); a dropout threshold of 0 keeps everything, else
# `dropped` ([T,T] scratch) holds drop(att) of one head.

# Kernels index slices (views from 0), not offsets into a buffer: numba's negative-index
# wraparound on offset indices would keep LLVM from vectorizing the loops.

@reduce_kernel
def softmax_causal_rows(att, T, scale):
    # rows of att[T*T] in place: p = exp(scale (s - max)) / sum over t2 <= t, zeros after t
    for t in range(T):
        row = att[t * T:(t + 1) * T]
        maxv = row[0]
        for t2 in range(1, t + 1):
            maxv = max(maxv, row[t2])
        total = 0.0
        for t2 in range(t + 1):
            e = fexp((row[t2] - maxv) * scale)
            row[t2] = e
            total += e
        inv = att.dtype.type(1.0 / total)
        for t2 in range(t + 1):
            row[t2] *= inv
        for t2 in range(t + 1, T):
            row[t2] = 0.0


@reduce_kernel
def softmax_causal_rows_backward(datt, att, T, scale):
    # datt[T*T] <- scale * p * (datt - sum_t2 p * datt) in place (d scores), p = att rows
    for t in range(T):
        p, d = att[t * T:(t + 1) * T], datt[t * T:(t + 1) * T]
        dot = 0.0
        for t2 in range(t + 1):
            dot += p[t2] * d[t2]
        for t2 in range(t + 1):
            d[t2] = scale * p[t2] * (d[t2] - dot)
        for t2 in range(t + 1, T):
            d[t2] = 0.0


@kernel
def attention_forward(out, att, qkv, B, T, NH, KV, hd, dropped, key, threshold, drop_scale):
    # att = softmax(q k^T / sqrt(hd)) causal; y = drop(att) v
    R, Y, g = (NH + 2 * KV) * hd, NH * hd, NH // KV
    scale = att.dtype.type(1.0 / math.sqrt(hd))
    for b in range(B):
        for h in range(NH):
            q, y, a = b * T * R + h * hd, b * T * Y + h * hd, (b * NH + h) * T * T
            k = b * T * R + (NH + h // g) * hd
            v = k + KV * hd
            gemm(False, True, T, T, hd, qkv, q, R, qkv, k, R, 0.0, att, a, T)
            softmax_causal_rows(att[a:a + T * T], T, scale)
            if threshold > 0:
                dropout_range(dropped, att[a:a + T * T], a, key, threshold, drop_scale)
                gemm(False, False, T, hd, T, dropped, 0, T, qkv, v, R, 0.0, out, y, Y)
            else:
                gemm(False, False, T, hd, T, att, a, T, qkv, v, R, 0.0, out, y, Y)


@kernel
def attention_backward(dqkv, dout, qkv, att, B, T, NH, KV, hd, datt, dropped, key, threshold, drop_scale):
    # d p = dy v^T (through the dropout mask); dv = drop(p)^T dy; d scores by the softmax
    # backward; dq = d scores k, dk = d scores^T q. datt: [T,T] scratch. Writes all of dqkv:
    # a KV head's dk, dv are its g query heads' terms summed in ascending h (the group's first
    # head writes, beta 0; the others add, beta 1).
    R, Y, g = (NH + 2 * KV) * hd, NH * hd, NH // KV
    scale = att.dtype.type(1.0 / math.sqrt(hd))
    for b in range(B):
        for h in range(NH):
            q, y, a = b * T * R + h * hd, b * T * Y + h * hd, (b * NH + h) * T * T
            k = b * T * R + (NH + h // g) * hd
            v = k + KV * hd
            beta = 0.0 if h % g == 0 else 1.0
            gemm(False, True, T, T, hd, dout, y, Y, qkv, v, R, 0.0, datt, 0, T)
            if threshold > 0:
                dropout_range(dropped, att[a:a + T * T], a, key, threshold, drop_scale)
                gemm(True, False, T, hd, T, dropped, 0, T, dout, y, Y, beta, dqkv, v, R)
                dropout_range(datt, datt, a, key, threshold, drop_scale)
            else:
                gemm(True, False, T, hd, T, att, a, T, dout, y, Y, beta, dqkv, v, R)
            softmax_causal_rows_backward(datt, att[a:a + T * T], T, scale)
            gemm(False, False, T, hd, T, datt, 0, T, qkv, k, R, 0.0, dqkv, q, R)
            gemm(True, False, T, hd, T, datt, 0, T, qkv, q, R, beta, dqkv, k, R)


# --- GELU, tanh approximation: gelu(x) = 0.5 x (1 + tanh(u)), u = s (x + 0.044715 x^3) ---------

@kernel
def gelu_forward(out, inp):
    for i in range(inp.size):
        x = inp[i]
        out[i] = HALF32 * x * (ONE32 + ftanh(GELU_S32 * (x + GELU_A32 * x * x * x)))


@kernel
def gelu_backward(d, inp):
    # d <- d * gelu'(inp) in place (an in-place loop vectorizes; aliased in/out ones do not):
    # gelu'(x) = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) s (1 + 3 * 0.044715 x^2)
    for i in range(inp.size):
        x = inp[i]
        t = ftanh(GELU_S32 * (x + GELU_A32 * x * x * x))
        du = GELU_S32 * (ONE32 + GELU_3A32 * x * x)
        d[i] = (HALF32 * (ONE32 + t) + HALF32 * x * (ONE32 - t * t) * du) * d[i]


# --- SwiGLU: gu[N,2I] = [gate | up] per row (one product); out[N,I] = silu(gate) up --------
# silu(x) = x s, s = sigmoid(x) = 1 / (1 + exp(-x))

@kernel
def swiglu_forward(out, gu):
    N, I = out.shape
    for i in range(N):
        g, u, o = gu[i, :I], gu[i, I:], out[i]
        for j in range(I):
            x = g[j]
            o[j] = x * (ONE32 / (ONE32 + fexp(-x))) * u[j]


@kernel
def swiglu_backward(dgu, gu, dout):
    # dgate = dout up s (1 + gate (1 - s)),  dup = dout silu(gate)  (dgu written, not aliasing gu)
    N, I = dout.shape
    for i in range(N):
        g, u, d = gu[i, :I], gu[i, I:], dout[i]
        dg, du = dgu[i, :I], dgu[i, I:]
        for j in range(I):
            x = g[j]
            sg = ONE32 / (ONE32 + fexp(-x))
            dg[j] = d[j] * u[j] * sg * (ONE32 + x * (ONE32 - sg))
            du[j] = d[j] * (x * sg)


# --- residual ----------------------------------------------------------------------------------

@kernel
def residual_forward(out, a, b):
    for i in range(out.size):
        out[i] = a[i] + b[i]


# --- fused softmax + cross-entropy over logits[N,Vp], the vocabulary the first V columns ------
# (columns V..Vp-1 are the LM head's padding: probability 0 and gradient 0, never read)

@reduce_kernel
def crossentropy_forward(losses, logits, targets, V):
    # loss_i = logsumexp(logits_i[:V]) - logits_i[target_i], 0 where target_i < 0 (ignored);
    # logits <- softmax(logits[:V]) in place, 0 after V
    N, Vp = logits.shape
    for i in range(N):
        t = targets[i]
        maxv = logits[i, 0]
        for v in range(1, V):
            maxv = max(maxv, logits[i, v])
        losses[i] = maxv - logits[i, t] if t >= 0 else 0.0
        total = 0.0
        for v in range(V):
            e = fexp(logits[i, v] - maxv)
            logits[i, v] = e
            total += e
        if t >= 0:
            losses[i] += math.log(total)
        inv = logits.dtype.type(1.0 / total)
        for v in range(V):
            logits[i, v] *= inv
        for v in range(V, Vp):
            logits[i, v] = 0.0


@kernel
def crossentropy_backward(dlogits, probs, targets, dloss, V):
    # dlogits = (probs - onehot(target)) dloss on the first V columns, 0 on the padding; a row
    # whose target is < 0 (ignored) is 0
    N, Vp = probs.shape
    for i in range(N):
        if targets[i] < 0:
            for v in range(Vp):
                dlogits[i, v] = 0.0
            continue
        for v in range(V):
            dlogits[i, v] = probs[i, v] * dloss
        for v in range(V, Vp):
            dlogits[i, v] = 0.0
        dlogits[i, targets[i]] -= dloss


@kernel
def sum_vector(x):
    s = 0.0
    for i in range(x.size):
        s += x[i]
    return s


# --- flat-buffer ops: reducer, gradient norm, AdamW --------------------------------------------

@kernel
def add_inplace(acc, x):
    for i in range(acc.size):
        acc[i] += x[i]


@kernel
def scale_inplace(x, s):
    for i in range(x.size):
        x[i] *= s


@kernel
def reduce_slots(slots, pairs, start, end, inv_m):
    # slots[dst] += slots[src] for each (dst, src) of the fixed tree, on [start, end); then
    # slots[0] *= inv_m; returns the sum of squares of the result
    for p in range(pairs.shape[0]):
        dst, src = pairs[p, 0], pairs[p, 1]
        for i in range(start, end):
            slots[dst, i] += slots[src, i]
    for i in range(start, end):
        slots[0, i] = slots[0, i] * inv_m
    return sum_squares(slots[0, start:end])


@kernel
def sum_squares(x):
    # float64, in a fixed order: 4 interleaved partial sums (x[i] goes to sum i % 4), combined
    # as (s0 + s1) + (s2 + s3); the independent chains run ~4x faster than one
    s0 = s1 = s2 = s3 = 0.0
    n4 = x.size - x.size % 4
    for i in range(0, n4, 4):
        a, b, c, d = np.float64(x[i]), np.float64(x[i + 1]), np.float64(x[i + 2]), np.float64(x[i + 3])
        s0 += a * a
        s1 += b * b
        s2 += c * c
        s3 += d * d
    for i in range(n4, x.size):
        v = np.float64(x[i])
        s0 += v * v
    return (s0 + s1) + (s2 + s3)


@kernel
def adamw_update(params, grads, m, v, ranges, b1, b2, ob1, ob2, step_size, inv_bc2_sqrt, eps,
                 decay, grad_scale):
    # PyTorch AdamW in float32 (the scalars: base.AdamWScalars): g = grad_scale grads;
    # m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p = p decay - step_size m / (sqrt(v)/sqrt(bc2) + eps)
    # with decay only on the rows of ranges marked 1 (2-D tensors)
    one = params.dtype.type(1.0)
    for r in range(ranges.shape[0]):
        d = decay if ranges[r, 2] != 0 else one
        for i in range(ranges[r, 0], ranges[r, 1]):
            g = grads[i] * grad_scale
            mi = b1 * m[i] + ob1 * g
            vi = b2 * v[i] + ob2 * g * g
            m[i] = mi
            v[i] = vi
            params[i] = params[i] * d - step_size * mi / (np.sqrt(vi) * inv_bc2_sqrt + eps)


# --- Muon: momentum (elementwise, any chunk) and the Newton-Schulz orthogonal update (whole matrices) ---

@kernel
def muon_momentum(m, grads, ranges, momentum, one_minus, nesterov, grad_scale):
    # on each (start, end) row of ranges, in float32: g = grad_scale grads;
    # m = momentum m + (1 - momentum) g; grads <- the update u = momentum m + (1 - momentum) g
    # (Nesterov), or m
    for r in range(ranges.shape[0]):
        for i in range(ranges[r, 0], ranges[r, 1]):
            g = grads[i] * grad_scale
            mi = momentum * m[i] + one_minus * g
            m[i] = mi
            grads[i] = momentum * mi + one_minus * g if nesterov else mi


@kernel
def newton_schulz(x, steps, a, b, c):
    # x[r, n] (r <= n, contiguous) <- its orthogonalization by `steps` quintic Newton-Schulz
    # iterations: X = X / (|X|_F + 1e-7); then A = X X^T, B = b A + c A A, X = a X + B X
    r, n = x.shape
    flat = x.reshape(-1)
    norm = x.dtype.type(math.sqrt(sum_squares(flat)) + 1e-7)
    for i in range(flat.size):
        flat[i] = flat[i] / norm
    A = np.empty((r, r), dtype=x.dtype)
    B = np.empty((r, r), dtype=x.dtype)
    Y = np.empty((r, n), dtype=x.dtype)
    fa, fb, fc = x.dtype.type(a), x.dtype.type(b), x.dtype.type(c)
    for _ in range(steps):
        gemm(False, True, r, r, n, x, 0, n, x, 0, n, 0.0, A, 0, r)  # A = X X^T
        gemm(False, False, r, r, r, A, 0, r, A, 0, r, 0.0, B, 0, r)  # B = A A
        for i in range(r):
            for j in range(r):
                B[i, j] = fb * A[i, j] + fc * B[i, j]
        gemm(False, False, r, n, r, B, 0, r, x, 0, n, 0.0, Y, 0, n)  # Y = B X
        for i in range(r):
            for j in range(n):
                x[i, j] = fa * x[i, j] + Y[i, j]


@kernel
def muon_orthogonal_update(p, u, steps, a, b, c, decay, step_size):
    # p <- p decay - step_size NS(u) for one matrix (p, u: 2-D views, rows may be strided); the
    # iteration runs on the wide orientation (u^T when u has more rows), as the reference does
    rows, cols = u.shape
    wide = rows <= cols
    x = np.empty((rows, cols) if wide else (cols, rows), dtype=u.dtype)
    for i in range(rows):
        for j in range(cols):
            if wide:
                x[i, j] = u[i, j]
            else:
                x[j, i] = u[i, j]
    newton_schulz(x, steps, a, b, c)
    for i in range(rows):
        for j in range(cols):
            o = x[i, j] if wide else x[j, i]
            p[i, j] = p[i, j] * decay - step_size * o


# --- the backend object --------------------------------------------------------------------------

def _rows(a):
    """View [..., K] as [N, K] (no copy; the arrays are contiguous)."""
    return a.reshape(-1, a.shape[-1])


def _heads(qkv, n_head: int, n_kv_head: int | None) -> tuple[int, int, int]:
    """(NH, KV, hd) of qkv[B,T,(NH + 2 KV) hd]; n_kv_head None means n_head (GPT-2)."""
    NH = int(n_head)
    KV = NH if n_kv_head is None else int(n_kv_head)
    width = qkv.shape[-1]
    if KV <= 0 or NH % KV or width % (NH + 2 * KV):
        raise ValueError(f"qkv width {width} does not hold {NH} query and {KV} key/value heads")
    return NH, KV, width // (NH + 2 * KV)


def _rope_args(qkv, cos, sin, n_head: int, n_kv_head: int) -> tuple[int, int, int]:
    """(T, heads rotated = NH + KV, hd) of the rotary kernels, once cos and sin are known to
    cover qkv[B,T,...]'s positions (the kernels do not check bounds)."""
    NH, KV, hd = _heads(qkv, n_head, n_kv_head)
    T = qkv.shape[1]
    if hd % 2 or cos.shape != sin.shape or cos.ndim != 2 or cos.shape[0] < T or cos.shape[1] != hd // 2:
        raise ValueError(f"rotary tables {cos.shape}, {sin.shape} do not fit {T} positions of head size {hd}")
    return T, NH + KV, hd


class CpuBackend:
    """Numba + NumPy implementation of `crystal.backends.base.Backend`."""

    name = "cpu"
    act_dtype = np.float32  # the cpu backend always computes in fp32

    def __init__(self):
        self.warm = False  # every kernel compiled (crystal.model.warm_up)
        self._local = threading.local()

    # memory
    def empty(self, shape, dtype="float32"):
        return np.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype="float32"):
        return np.zeros(shape, dtype=dtype)

    def to_device(self, host_array):
        return np.ascontiguousarray(host_array)

    def stage(self, batches, vocab_size, keys=None):
        return [(self.to_device(x), self.to_device(y)) for x, y in batches]  # the ops read them as they are

    def to_host(self, array):
        return array

    def sphere_context(self, index: int):
        return contextlib.nullcontext()

    def zero(self, x):
        x.fill(0)

    def record_event(self):
        return None  # cpu work is complete when the call returns

    def wait_event(self, event):
        pass

    def compute_weights(self, flat, out=None):
        return flat

    def synchronize(self) -> None:
        """Nothing to wait for: every op has returned when it is done."""

    # ops
    def encoder_forward(self, out, idx, wte, wpe):
        encoder_forward(out, idx, wte, wpe)

    def encoder_backward(self, dwte, dwpe, dout, idx):
        encoder_backward(dwte, dwpe, dout, idx)

    def layernorm_forward(self, out, mean, rstd, inp, w, b, eps):
        layernorm_forward(_rows(out), mean.reshape(-1), rstd.reshape(-1), _rows(inp), w, b,
                          float(eps))

    def layernorm_backward(self, dinp, dw, db, dout, inp, w, mean, rstd):
        layernorm_backward(_rows(dinp), dw, db, _rows(dout), _rows(inp), w, mean.reshape(-1),
                           rstd.reshape(-1))

    def matmul_forward(self, out, inp, w, bias):
        matmul_forward(_rows(out), _rows(inp), w, bias)

    def matmul_backward(self, dinp, dw, dbias, dout, inp, w):
        matmul_backward(_rows(dinp), dw, dbias, _rows(dout), _rows(inp), w)

    def matmul_columns_forward(self, out, inp, w, lo):
        matmul_columns_forward(_rows(out), _rows(inp), w, lo)

    def matmul_columns_backward(self, dinp, dw, dout, inp, w, lo):
        matmul_columns_backward(_rows(dinp), dw, _rows(dout), _rows(inp), w, lo)

    def linear_forward(self, out, inp, w, bias):
        linear_forward(_rows(out), _rows(inp), w, bias)

    def linear_backward(self, dinp, dw, dbias, dout, inp, w):
        linear_backward(_rows(dinp), dw, dbias, _rows(dout), _rows(inp), w)

    def matmul_gelu_forward(self, out, pre, inp, w, bias):
        self.matmul_forward(pre, inp, w, bias)
        self.gelu_forward(out, pre)

    def lm_head_forward(self, logits, inp, wte):
        lm_head_forward(_rows(logits), _rows(inp), wte)

    def lm_head_backward(self, dinp, dwte, dlogits, inp, wte):
        lm_head_backward(_rows(dinp), dwte, _rows(dlogits), _rows(inp), wte)

    def attention_saved(self, B, n_head, T, head_size):
        return (B, n_head, T, T), np.float32

    def attention_forward(self, out, att, qkv, n_head, drop=None, *, n_kv_head=None):
        B, T = qkv.shape[:2]
        attention_forward(out.reshape(-1), att.reshape(-1), qkv.reshape(-1), B, T,
                          *_heads(qkv, n_head, n_kv_head), *self._drop_args(drop, T, att.dtype))

    def attention_backward(self, dqkv, dout, qkv, att, n_head, drop=None, *, out=None, n_kv_head=None):
        B, T = qkv.shape[:2]
        datt = self._scratch("datt", (T * T,), att.dtype)
        attention_backward(dqkv.reshape(-1), dout.reshape(-1), qkv.reshape(-1), att.reshape(-1), B, T,
                           *_heads(qkv, n_head, n_kv_head), datt, *self._drop_args(drop, T, att.dtype))

    def _drop_args(self, drop, T, dtype):
        """(dropped scratch [T*T], key, threshold, scale) for the attention kernels; threshold 0
        (no drop) keeps every probability."""
        key, threshold, scale = drop or (0, 0, 1.0)
        return (self._scratch("att_dropped", (T * T,), dtype), np.uint64(key), np.uint64(threshold),
                dtype.type(scale))

    def _scratch(self, key: str, shape, dtype=np.float32):
        """A per-thread buffer, allocated on first use for each (key, shape) and then reused."""
        store = self._local.__dict__.setdefault("buffers", {})
        k = (key, tuple(shape), np.dtype(dtype))
        if k not in store:
            store[k] = np.empty(shape, dtype=dtype)
        return store[k]

    def gelu_forward(self, out, inp):
        gelu_forward(out.reshape(-1), inp.reshape(-1))

    def gelu_backward(self, dinp, inp, dout):
        if dinp is not dout:
            np.copyto(dinp, dout)
        gelu_backward(dinp.reshape(-1), inp.reshape(-1))

    def residual_layernorm_forward(self, res, out, mean, rstd, a, b, w, bias, eps):
        self.residual_forward(res, a, b)
        self.layernorm_forward(out, mean, rstd, res, w, bias, eps)

    def rmsnorm_forward(self, out, rstd, inp, w, eps):
        rmsnorm_forward(_rows(out), rstd.reshape(-1), _rows(inp), w, float(eps))

    def rmsnorm_backward(self, dinp, dw, dout, inp, w, rstd):
        rmsnorm_backward(_rows(dinp), dw, _rows(dout), _rows(inp), w, rstd.reshape(-1))

    def residual_rmsnorm_forward(self, res, out, rstd, a, b, w, eps):
        self.residual_forward(res, a, b)
        self.rmsnorm_forward(out, rstd, res, w, eps)

    def rope_forward(self, qkv, cos, sin, n_head, n_kv_head):
        rope_forward(_rows(qkv), cos, sin, *_rope_args(qkv, cos, sin, n_head, n_kv_head))

    def rope_backward(self, dqkv, cos, sin, n_head, n_kv_head):
        rope_backward(_rows(dqkv), cos, sin, *_rope_args(dqkv, cos, sin, n_head, n_kv_head))

    def swiglu_forward(self, out, gu):
        swiglu_forward(_rows(out), _rows(gu))

    def swiglu_backward(self, dgu, gu, dout):
        swiglu_backward(_rows(dgu), _rows(gu), _rows(dout))

    def residual_forward(self, out, a, b):
        residual_forward(out.reshape(-1), a.reshape(-1), b.reshape(-1))

    def dropout(self, out, inp, key, threshold, scale):
        dropout(out.reshape(-1), inp.reshape(-1), np.uint64(key), np.uint64(threshold),
                inp.dtype.type(scale))

    def crossentropy_forward(self, losses, probs, logits, targets, vocab=None):
        if probs is not logits:
            np.copyto(probs, logits)
        crossentropy_forward(losses.reshape(-1), _rows(probs), targets.reshape(-1), vocab_columns(probs, vocab))

    def crossentropy_forward_backward(self, losses, dlogits, logits, targets, dloss, vocab=None):
        self.crossentropy_forward(losses, dlogits, logits, targets, vocab)
        self.crossentropy_backward(dlogits, dlogits, targets, dloss, vocab)

    def crossentropy_backward(self, dlogits, probs, targets, dloss, vocab=None):
        crossentropy_backward(_rows(dlogits), _rows(probs), targets.reshape(-1), float(dloss), vocab_columns(probs, vocab))

    def sum_losses(self, losses, out=None):
        total = float(sum_vector(losses.reshape(-1)))
        if out is None:
            return total
        out[0] = total

    def add_inplace(self, acc, x):
        add_inplace(acc, x)

    def scale_inplace(self, x, s):
        scale_inplace(x, float(s))

    def sum_squares(self, x):
        return float(sum_squares(x))

    def reduce_slots(self, slots, pairs, start, end, inv_m):
        return float(reduce_slots(slots, pairs, int(start), int(end), float(inv_m)))

    def adamw_update(self, params, grads, m, v, ranges, scalars, compute=None):  # compute: params itself
        adamw_update(params, grads, m, v, ranges, *scalars)

    def muon_momentum(self, m, grads, ranges, momentum, nesterov, grad_scale):
        f = np.float32
        muon_momentum(m, grads, ranges, f(momentum), f(1.0 - momentum), bool(nesterov), f(grad_scale))

    def muon_orthogonal_update(self, p, u, steps, coeffs, decay, step_size):
        f = np.float32
        muon_orthogonal_update(p, u, int(steps), *(float(k) for k in coeffs), f(decay), f(step_size))


@contextlib.contextmanager
def blas_threads(n: int = 1):
    """n BLAS threads per caller while training: spheres are the parallelism (n = 1), or, with
    fewer spheres than cores, the cores left over split among them (only where
    `blas_threads_agree(n, ...)`: the products must keep their bits for any sphere count)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=n, user_api="blas"):
        yield


def product_shapes(n_embd: int, vocab_size: int, rows: int) -> tuple[tuple[int, int, int, bool], ...]:
    """(rows, in, out, lm head?) of every matmul of a micro-batch of `rows` tokens: qkv, the
    attention's projection, fc, fc's projection, and the tied LM head (rows x C x V)."""
    c = n_embd
    return ((rows, c, 3 * c, False), (rows, c, c, False), (rows, c, 4 * c, False), (rows, 4 * c, c, False),
            (rows, c, vocab_size, True))


@functools.lru_cache(maxsize=16)
def blas_threads_agree(n: int, shapes: tuple[tuple[int, int, int, bool], ...]) -> bool:
    """Whether the kernels' products (forward and both backward products of each shape, through
    matmul_* or lm_head_*) have bitwise the same values at 1 and n BLAS threads. BLAS libraries
    usually split a product's output among threads and keep each element's summation order, but
    that is not promised: this checks the BLAS in use, at the run's own shapes."""
    rng = np.random.default_rng(0)
    for rows, c_in, c_out, head in shapes:
        inp = rng.standard_normal((rows, c_in), dtype=np.float32)
        w = rng.standard_normal((c_out, c_in) if head else (c_in, c_out), dtype=np.float32)
        dout = rng.standard_normal((rows, c_out), dtype=np.float32)
        bias = np.zeros(c_out, dtype=np.float32)
        results = []
        for threads in (1, n):
            out, dinp, dw, dbias = np.empty_like(dout), np.empty_like(inp), np.empty_like(w), np.empty_like(bias)
            with blas_threads(threads):
                if head:
                    lm_head_forward(out, inp, w)
                    lm_head_backward(dinp, dw, dout, inp, w)
                else:
                    matmul_forward(out, inp, w, bias)
                    matmul_backward(dinp, dw, dbias, dout, inp, w)
            results.append(b"".join(a.tobytes() for a in (out, dinp, dw)))
        if results[0] != results[1]:
            return False
    return True


@functools.lru_cache(maxsize=16)
def newton_schulz_threads_agree(n: int, shapes: tuple[tuple[int, int], ...], steps: int,
                                coeffs: tuple[float, float, float]) -> bool:
    """Whether Muon's orthogonal update (muon_orthogonal_update) of matrices of these (rows, cols)
    has bitwise the same values at 1 and n BLAS threads (as blas_threads_agree, for Newton-Schulz)."""
    rng = np.random.default_rng(0)
    for rows, cols in shapes:
        u = rng.standard_normal((rows, cols), dtype=np.float32)
        results = []
        for threads in (1, n):
            p = np.zeros((rows, cols), dtype=np.float32)
            with blas_threads(threads):
                muon_orthogonal_update(p, u.copy(), steps, *coeffs, np.float32(1), np.float32(1))
            results.append(p.tobytes())
        if results[0] != results[1]:
            return False
    return True
