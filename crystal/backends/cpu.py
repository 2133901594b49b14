"""CPU backend: numba kernels (nogil, so sphere threads run them in parallel) + NumPy's BLAS.

Each op is a forward/backward pair of `@kernel` functions, side by side, in llm.c's style.
The kernels are dtype-generic (the tests run them in float64 for finite differences) and
single-threaded: parallelism comes from the spheres, one thread each, with BLAS limited to
one thread per caller (see `blas_single_thread`). Reductions run in a fixed order with
float64 accumulators, so every op is bitwise reproducible for the same inputs.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
from numba import njit

kernel = njit(nogil=True, cache=True, error_model="numpy")

GELU_SCALE = math.sqrt(2.0 / math.pi)


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

@kernel
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


@kernel
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


# --- causal self-attention, qkv[B,T,3C] -> out[B,T,C], att[B,NH,T,T] softmax probs ------------

@kernel
def attention_forward(out, att, qkv, n_head):
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    scale = 1.0 / math.sqrt(hs)
    for b in range(B):
        for h in range(n_head):
            qo = h * hs
            ko = C + h * hs
            vo = 2 * C + h * hs
            for t in range(T):
                # scores s[t2] = q_t . k_t2 / sqrt(hs) for t2 <= t, then a stable softmax
                maxv = -np.inf
                for t2 in range(t + 1):
                    s = 0.0
                    for i in range(hs):
                        s += qkv[b, t, qo + i] * qkv[b, t2, ko + i]
                    s *= scale
                    att[b, h, t, t2] = s
                    if s > maxv:
                        maxv = s
                total = 0.0
                for t2 in range(t + 1):
                    e = math.exp(att[b, h, t, t2] - maxv)
                    att[b, h, t, t2] = e
                    total += e
                inv = 1.0 / total
                for t2 in range(t + 1):
                    att[b, h, t, t2] *= inv
                for t2 in range(t + 1, T):
                    att[b, h, t, t2] = 0.0
                # out_t = sum_t2 att[t2] v_t2
                for i in range(hs):
                    out[b, t, qo + i] = 0.0
                for t2 in range(t + 1):
                    a = att[b, h, t, t2]
                    for i in range(hs):
                        out[b, t, qo + i] += a * qkv[b, t2, vo + i]


@kernel
def attention_backward(dqkv, dout, qkv, att, n_head):
    # datt = dout . v;  dpre = att * (datt - sum(att * datt));  dq = dpre k / sqrt(hs), dk = dpre q / sqrt(hs)
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    scale = 1.0 / math.sqrt(hs)
    datt = np.empty(T)
    for b in range(B):
        for t in range(T):
            for c in range(C3):
                dqkv[b, t, c] = 0.0
    for b in range(B):
        for h in range(n_head):
            qo = h * hs
            ko = C + h * hs
            vo = 2 * C + h * hs
            for t in range(T):
                dot = 0.0
                for t2 in range(t + 1):
                    d = 0.0
                    for i in range(hs):
                        d += dout[b, t, qo + i] * qkv[b, t2, vo + i]
                    datt[t2] = d
                    dot += att[b, h, t, t2] * d
                for t2 in range(t + 1):
                    a = att[b, h, t, t2]
                    dpre = a * (datt[t2] - dot) * scale
                    for i in range(hs):
                        dqkv[b, t, qo + i] += dpre * qkv[b, t2, ko + i]
                        dqkv[b, t2, ko + i] += dpre * qkv[b, t, qo + i]
                        dqkv[b, t2, vo + i] += a * dout[b, t, qo + i]


# --- GELU, tanh approximation -----------------------------------------------------------------

@kernel
def gelu_forward(out, inp):
    for i in range(inp.size):
        v = inp[i]
        out[i] = 0.5 * v * (1.0 + math.tanh(GELU_SCALE * (v + 0.044715 * v * v * v)))


@kernel
def gelu_backward(dinp, inp, dout):
    # d/dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) u',  u = s (x + 0.044715 x^3)
    for i in range(inp.size):
        v = inp[i]
        th = math.tanh(GELU_SCALE * (v + 0.044715 * v * v * v))
        du = GELU_SCALE * (1.0 + 3.0 * 0.044715 * v * v)
        dinp[i] = (0.5 * (1.0 + th) + 0.5 * v * (1.0 - th * th) * du) * dout[i]


# --- residual ----------------------------------------------------------------------------------

@kernel
def residual_forward(out, a, b):
    for i in range(out.size):
        out[i] = a[i] + b[i]


# --- fused softmax + cross-entropy over logits[N,V] --------------------------------------------

@kernel
def crossentropy_forward(losses, probs, logits, targets):
    # loss_i = logsumexp(logits_i) - logits_i[target_i]; probs may alias logits
    N, V = logits.shape
    for i in range(N):
        maxv = -np.inf
        for v in range(V):
            if logits[i, v] > maxv:
                maxv = logits[i, v]
        total = 0.0
        for v in range(V):
            total += math.exp(logits[i, v] - maxv)
        lse = maxv + math.log(total)
        losses[i] = lse - logits[i, targets[i]]
        for v in range(V):
            probs[i, v] = math.exp(logits[i, v] - lse)


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
def sum_squares(x):
    s = 0.0
    for i in range(x.size):
        v = np.float64(x[i])
        s += v * v
    return s


@kernel
def adamw_update(params, grads, m, v, ranges, lr, beta1, beta2, eps, weight_decay, step,
                 grad_scale):
    # PyTorch AdamW: p *= 1 - lr wd;  p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)
    bc1 = 1.0 - beta1 ** step
    bc2_sqrt = math.sqrt(1.0 - beta2 ** step)
    step_size = lr / bc1
    for r in range(ranges.shape[0]):
        decay = 1.0 - lr * weight_decay if ranges[r, 2] != 0 else 1.0
        for i in range(ranges[r, 0], ranges[r, 1]):
            g = grads[i] * grad_scale
            mi = beta1 * m[i] + (1.0 - beta1) * g
            vi = beta2 * v[i] + (1.0 - beta2) * g * g
            m[i] = mi
            v[i] = vi
            params[i] = params[i] * decay - step_size * mi / (math.sqrt(vi) / bc2_sqrt + eps)


# --- the backend object --------------------------------------------------------------------------

def _rows(a):
    """View [..., K] as [N, K] (no copy; the arrays are contiguous)."""
    return a.reshape(-1, a.shape[-1])


class CpuBackend:
    """Numba + NumPy implementation of `crystal.backends.base.Backend`."""

    name = "cpu"

    def __init__(self):
        self._warm = False

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

    def attention_forward(self, out, att, qkv, n_head):
        attention_forward(out, att, qkv, int(n_head))

    def attention_backward(self, dqkv, dout, qkv, att, n_head):
        attention_backward(dqkv, dout, qkv, att, int(n_head))

    def gelu_forward(self, out, inp):
        gelu_forward(out.reshape(-1), inp.reshape(-1))

    def gelu_backward(self, dinp, inp, dout):
        gelu_backward(dinp.reshape(-1), inp.reshape(-1), dout.reshape(-1))

    def residual_forward(self, out, a, b):
        residual_forward(out.reshape(-1), a.reshape(-1), b.reshape(-1))

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

    def adamw_update(self, params, grads, m, v, ranges, lr, beta1, beta2, eps, weight_decay,
                     step, grad_scale):
        adamw_update(params, grads, m, v, ranges, float(lr), float(beta1), float(beta2),
                     float(eps), float(weight_decay), int(step), float(grad_scale))


@contextlib.contextmanager
def blas_single_thread():
    """One BLAS thread per caller while training: spheres are the parallelism, and a fixed
    BLAS thread count keeps every matmul's summation order the same for any sphere count."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield
