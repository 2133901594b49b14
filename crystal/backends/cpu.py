"""CPU backend: numba kernels (nogil, so sphere threads run them in parallel) + NumPy's BLAS.

Each op is a forward/backward pair of `@kernel` functions, side by side, in llm.c's style.
The kernels are dtype-generic (the tests run them in float64 for finite differences) and
single-threaded: parallelism comes from the spheres, one thread each, with BLAS limited to
one thread per caller (see `blas_single_thread`). Reductions accumulate in float64 in an
order fixed by the compiled code (row sums are `@reduce_kernel`s, vectorized by reassociation),
so every op is bitwise reproducible for the same inputs on a machine. exp and tanh, which numba
does not vectorize, go to NumPy's SIMD float32 loops between numba sweeps.
"""

from __future__ import annotations

import contextlib
import math
import threading

import numpy as np
from numba import njit

from crystal.dropout import GOLDEN, MIX1, MIX2

kernel = njit(nogil=True, cache=True, error_model="numpy")
# For row reductions: lets LLVM reassociate sums so they vectorize (the order is still fixed by
# the compiled code, so results stay bitwise reproducible on a machine; NaN/inf semantics kept).
reduce_kernel = njit(nogil=True, cache=True, error_model="numpy", fastmath={"reassoc", "contract"})

GELU_SCALE = math.sqrt(2.0 / math.pi)
# float32 constants keep the pointwise kernels in float32, so LLVM vectorizes them
GELU_S32, GELU_A32, GELU_3A32 = np.float32(GELU_SCALE), np.float32(0.044715), np.float32(3 * 0.044715)
HALF32, ONE32 = np.float32(0.5), np.float32(1.0)


# --- encoder: out[b,t] = wte[idx[b,t]] + wpe[t] ---------------------------------------------

@kernel
def encoder_forward(out, idx, wte, wpe):
    B, T = idx.shape
    C = wte.shape[1]
    for b in range(B):
        for t in range(T):
            ix = idx[b, t]
            for c in range(C):
                out[b, t, c] = wte[ix, c] + wpe[t, c]


@kernel
def encoder_backward(dwte, dwpe, dout, idx):
    # dwpe is written (all rows: positions >= T get zero); dwte accumulates rows in (b, t)
    # order, a fixed order as in llm.c.
    B, T = idx.shape
    C = dwte.shape[1]
    for t in range(dwpe.shape[0]):
        for c in range(C):
            dwpe[t, c] = 0.0
    for b in range(B):
        for t in range(T):
            ix = idx[b, t]
            for c in range(C):
                d = dout[b, t, c]
                dwte[ix, c] += d
                dwpe[t, c] += d


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
    N, C = inp.shape
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
            db[c] += dout[i, c]
            dw[c] += norm * dout[i, c]
            dinp[i, c] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * s


# --- bias of a matmul (the product itself goes to BLAS) --------------------------------------

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


# --- causal self-attention: score and value products go to BLAS, per (batch, head) ----------
# The kernels below are the softmax and its backward over att[B,NH,T,T] rows, causal: row t
# covers positions t2 <= t, the rest is zero.

# The forward is three sweeps, like GELU's: numba has no SIMD exp, NumPy's float32 exp is one.

@kernel
def softmax_causal_shift(att, scale):
    # att[..., t, :] <- scale * (att[..., t, :] - max over t2 <= t) for t2 <= t, -inf after t
    B, NH, T, _ = att.shape
    for b in range(B):
        for h in range(NH):
            for t in range(T):
                row = att[b, h, t]
                maxv = row[0]
                for t2 in range(1, t + 1):
                    if row[t2] > maxv:
                        maxv = row[t2]
                for t2 in range(t + 1):
                    row[t2] = (row[t2] - maxv) * scale
                for t2 in range(t + 1, T):
                    row[t2] = -np.inf


@reduce_kernel
def softmax_causal_normalize(att):
    # att[..., t, :] <- att / sum over t2 <= t (a float64 sum in order); after t it is exp(-inf) = 0
    B, NH, T, _ = att.shape
    for b in range(B):
        for h in range(NH):
            for t in range(T):
                row = att[b, h, t]
                total = 0.0
                for t2 in range(t + 1):
                    total += row[t2]
                inv = row.dtype.type(1.0 / total)
                for t2 in range(t + 1):
                    row[t2] *= inv


def softmax_causal_forward(att, scale):
    """att[..., t, :] <- softmax(scale * att[..., t, :t+1]) in place, zeros after t."""
    softmax_causal_shift(att, att.dtype.type(scale))
    np.exp(att, out=att)
    softmax_causal_normalize(att)


@reduce_kernel
def softmax_causal_backward(datt, att, scale):
    # datt <- scale * att * (datt - sum_t2 att * datt) in place (the gradient of the scores)
    B, NH, T, _ = att.shape
    for b in range(B):
        for h in range(NH):
            for t in range(T):
                a = att[b, h, t]
                d = datt[b, h, t]
                dot = 0.0
                for t2 in range(t + 1):
                    dot += a[t2] * d[t2]
                for t2 in range(t + 1):
                    d[t2] = scale * a[t2] * (d[t2] - dot)
                for t2 in range(t + 1, T):
                    d[t2] = 0.0


# --- GELU, tanh approximation: gelu(x) = 0.5 x (1 + tanh(u)), u = s (x + 0.044715 x^3) ---------
# numba has no SIMD tanh here, NumPy's float32 tanh is; so each pass is three vectorized sweeps:
# u (numba) -> tanh(u) in place (NumPy) -> the output or the local derivative (numba).

@kernel
def gelu_tanh_arg(u, x):
    for i in range(x.size):
        v = x[i]
        u[i] = GELU_S32 * (v + GELU_A32 * v * v * v)


@kernel
def gelu_forward_finish(out, x, th):
    for i in range(x.size):
        out[i] = HALF32 * x[i] * (ONE32 + th[i])


@kernel
def gelu_backward_finish(dinp, x, th, dout):
    # d/dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) s (1 + 3 * 0.044715 x^2)
    for i in range(x.size):
        v = x[i]
        t = th[i]
        du = GELU_S32 * (ONE32 + GELU_3A32 * v * v)
        dinp[i] = (HALF32 * (ONE32 + t) + HALF32 * v * (ONE32 - t * t) * du) * dout[i]


# --- residual ----------------------------------------------------------------------------------

@kernel
def residual_forward(out, a, b):
    for i in range(out.size):
        out[i] = a[i] + b[i]


# --- dropout: out = inp * keep(key, i) * scale, the mask hash of crystal.dropout --------------

U30, U27, U31, U32 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(32)
GOLDEN_U64, MIX1_U64, MIX2_U64 = np.uint64(GOLDEN), np.uint64(MIX1), np.uint64(MIX2)


@kernel
def dropout(out, inp, key, threshold, scale):
    # one op for both passes: the backward applies the forward's mask to the gradient
    k, thr = np.uint64(key), np.uint64(threshold)
    for i in range(out.size):
        z = k + np.uint64(i + 1) * GOLDEN_U64
        z = (z ^ (z >> U30)) * MIX1_U64
        z = (z ^ (z >> U27)) * MIX2_U64
        z ^= z >> U31
        if (z >> U32) >= thr:
            out[i] = inp[i] * scale
        else:
            out[i] = 0


# --- fused softmax + cross-entropy over logits[N,V] --------------------------------------------

# Like the softmax: shift by the row max (numba), exp (NumPy's SIMD float32 exp), normalize.

@kernel
def crossentropy_shift(losses, probs, logits, targets):
    # probs_i <- logits_i - max(logits_i);  losses_i <- -(shifted logit of the target)
    N, V = logits.shape
    for i in range(N):
        maxv = logits[i, 0]
        for v in range(1, V):
            if logits[i, v] > maxv:
                maxv = logits[i, v]
        losses[i] = maxv - logits[i, targets[i]]
        for v in range(V):
            probs[i, v] = logits[i, v] - maxv


@reduce_kernel
def crossentropy_normalize(losses, probs):
    # probs_i = exp(shifted) / total;  loss_i = log(total) - shifted target = lse - logit target
    N, V = probs.shape
    for i in range(N):
        total = 0.0
        for v in range(V):
            total += probs[i, v]
        losses[i] += math.log(total)
        inv = probs.dtype.type(1.0 / total)
        for v in range(V):
            probs[i, v] *= inv


def crossentropy_forward(losses, probs, logits, targets):
    """loss_i = logsumexp(logits_i) - logits_i[target_i], probs = softmax(logits) (may alias)."""
    crossentropy_shift(losses, probs, logits, targets)
    np.exp(probs, out=probs)
    crossentropy_normalize(losses, probs)


@kernel
def crossentropy_backward(dlogits, probs, targets, dloss):
    N, V = probs.shape
    for i in range(N):
        for v in range(V):
            dlogits[i, v] = probs[i, v] * dloss
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


# --- the backend object --------------------------------------------------------------------------

def _heads(qkv, n_head):
    """q, k, v of qkv[B,T,3C] as [B,NH,T,hs] strided views (each head's rows stride 3C)."""
    B, T, C3 = qkv.shape
    hs = C3 // 3 // n_head
    x = qkv.reshape(B, T, 3, n_head, hs)
    return tuple(x[:, :, i].transpose(0, 2, 1, 3) for i in range(3))


def _merge_view(y, n_head):
    """y[B,T,C] as a [B,NH,T,hs] strided view (head h at channels h*hs ...)."""
    B, T, C = y.shape
    return y.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


def _rows(a):
    """View [..., K] as [N, K] (no copy; the arrays are contiguous)."""
    return a.reshape(-1, a.shape[-1])


class CpuBackend:
    """Numba + NumPy implementation of `crystal.backends.base.Backend`."""

    name = "cpu"

    def __init__(self):
        self._warm = False
        self._local = threading.local()

    # memory
    def empty(self, shape, dtype="float32"):
        return np.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype="float32"):
        return np.zeros(shape, dtype=dtype)

    def to_device(self, host_array):
        return np.ascontiguousarray(host_array)

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

    def warmup(self) -> None:
        """Compile (or load from numba's cache) every kernel for float32 before threads start."""
        if self._warm:
            return
        from crystal.model import warmup_backend  # a tiny forward/backward touches every op

        warmup_backend(self)
        self._warm = True

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
        out2 = _rows(out)
        np.matmul(_rows(inp), w, out=out2)
        if bias is not None:
            bias_forward(out2, bias)

    def matmul_backward(self, dinp, dw, dbias, dout, inp, w):
        dout2 = _rows(dout)
        np.matmul(dout2, w.T, out=_rows(dinp))
        np.matmul(_rows(inp).T, dout2, out=dw)
        if dbias is not None:
            bias_backward(dbias, dout2)

    def lm_head_forward(self, logits, inp, wte):
        np.matmul(_rows(inp), wte.T, out=_rows(logits))

    def lm_head_backward(self, dinp, dwte, dlogits, inp, wte):
        dl = _rows(dlogits)
        np.matmul(dl, wte, out=_rows(dinp))
        np.matmul(dl.T, _rows(inp), out=dwte)

    def attention_forward(self, out, att, qkv, n_head, drop=None):
        q, k, v = _heads(qkv, n_head)  # [B,NH,T,hs] views of qkv, no copies
        np.matmul(q, k.transpose(0, 1, 3, 2), out=att)  # all T x T scores; the softmax masks
        softmax_causal_forward(att, 1.0 / math.sqrt(q.shape[-1]))
        np.matmul(self._dropped(att, drop), v, out=_merge_view(out, n_head))  # y = att v, in place

    def attention_backward(self, dqkv, dout, qkv, att, n_head, drop=None):
        q, k, v = _heads(qkv, n_head)
        dq, dk, dv = _heads(dqkv, n_head)
        dy = _merge_view(dout, n_head)
        datt = self._scratch("datt", att.shape, att.dtype)
        np.matmul(dy, v.transpose(0, 1, 3, 2), out=datt)  # d att = dy v^T
        np.matmul(self._dropped(att, drop).transpose(0, 1, 3, 2), dy, out=dv)  # d v = att^T dy
        if drop:
            self.dropout(datt, datt, *drop)  # through the dropout: the same mask
        softmax_causal_backward(datt, att, 1.0 / math.sqrt(q.shape[-1]))  # -> d scores
        np.matmul(datt, k, out=dq)  # d q = d scores k
        np.matmul(datt.transpose(0, 1, 3, 2), q, out=dk)  # d k = d scores^T q

    def _dropped(self, att, drop):
        """att, or dropout(att) in a per-thread scratch buffer (recomputed by the backward)."""
        if not drop:
            return att
        out = self._scratch("att_dropped", att.shape, att.dtype)
        self.dropout(out, att, *drop)
        return out

    def _scratch(self, key: str, shape, dtype=np.float32):
        """A per-thread buffer, allocated on first use for each (key, shape) and then reused."""
        store = self._local.__dict__.setdefault("buffers", {})
        k = (key, tuple(shape), np.dtype(dtype))
        if k not in store:
            store[k] = np.empty(shape, dtype=dtype)
        return store[k]

    def gelu_forward(self, out, inp):
        x = inp.reshape(-1)
        th = self._scratch("gelu", x.shape, x.dtype)
        gelu_tanh_arg(th, x)
        np.tanh(th, out=th)
        gelu_forward_finish(out.reshape(-1), x, th)

    def gelu_backward(self, dinp, inp, dout):
        x = inp.reshape(-1)
        th = self._scratch("gelu", x.shape, x.dtype)
        gelu_tanh_arg(th, x)
        np.tanh(th, out=th)
        gelu_backward_finish(dinp.reshape(-1), x, th, dout.reshape(-1))

    def residual_forward(self, out, a, b):
        residual_forward(out.reshape(-1), a.reshape(-1), b.reshape(-1))

    def dropout(self, out, inp, key, threshold, scale):
        dropout(out.reshape(-1), inp.reshape(-1), key, threshold, inp.dtype.type(scale))

    def crossentropy_forward(self, losses, probs, logits, targets):
        crossentropy_forward(losses.reshape(-1), _rows(probs), _rows(logits), targets.reshape(-1))

    def crossentropy_backward(self, dlogits, probs, targets, dloss):
        crossentropy_backward(_rows(dlogits), _rows(probs), targets.reshape(-1), float(dloss))

    def sum_losses(self, losses):
        return float(sum_vector(losses.reshape(-1)))

    def add_inplace(self, acc, x):
        add_inplace(acc, x)

    def scale_inplace(self, x, s):
        scale_inplace(x, float(s))

    def sum_squares(self, x):
        return float(sum_squares(x))

    def reduce_slots(self, slots, pairs, start, end, inv_m):
        return float(reduce_slots(slots, pairs, int(start), int(end), float(inv_m)))

    def adamw_update(self, params, grads, m, v, ranges, scalars):
        adamw_update(params, grads, m, v, ranges, *scalars)


@contextlib.contextmanager
def blas_single_thread():
    """One BLAS thread per caller while training: spheres are the parallelism, and a fixed
    BLAS thread count keeps every matmul's summation order the same for any sphere count."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield
