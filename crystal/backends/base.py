"""The op protocol every backend implements; `crystal.model` is written once against it.

Shapes use B batch, T time, C channels, NH heads, V vocabulary, N = B*T rows. Arrays are the
backend's own (numpy on cpu, cupy on cuda), C-contiguous. Conventions that make gradients
cheap and deterministic:

- Parameter gradients (dw, db) are *written*, never accumulated, so a gradient buffer needs
  no zeroing between micro-batches. The one exception is the tied token embedding: the LM
  head writes dwte, then `encoder_backward` adds the embedding's scatter into it.
- Activation gradients flowing into the residual stream (`layernorm_backward`'s dinp) are
  *accumulated*; everything else is written.
- Every reduction has a fixed order, so each op is bitwise reproducible run to run.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Protocol

import numpy as np

Array = Any


class AdamWScalars(NamedTuple):
    """One AdamW step's scalars, made in float64 and rounded once to float32: every backend's
    kernel then runs the update in float32 (as PyTorch does) from these same values."""

    beta1: np.float32
    beta2: np.float32
    one_minus_beta1: np.float32
    one_minus_beta2: np.float32
    step_size: np.float32  # lr / (1 - beta1^t)
    inv_bc2_sqrt: np.float32  # 1 / sqrt(1 - beta2^t)
    eps: np.float32
    decay: np.float32  # 1 - lr * weight_decay (on 2-D tensors; 1 elsewhere)
    grad_scale: np.float32

    @classmethod
    def of(cls, lr, beta1, beta2, eps, weight_decay, step, grad_scale) -> "AdamWScalars":
        f = np.float32
        return cls(f(beta1), f(beta2), f(1.0 - beta1), f(1.0 - beta2), f(lr / (1.0 - beta1 ** step)),
                   f(1.0 / math.sqrt(1.0 - beta2 ** step)), f(eps), f(1.0 - lr * weight_decay), f(grad_scale))

    def packed(self, skip: bool = False) -> np.ndarray:
        """float32[10]: the fields in order, then the skip flag (the cuda kernels read these from
        device memory, so a captured step replays with each step's values)."""
        return np.array([*self, 1.0 if skip else 0.0], dtype=np.float32)


def vocab_columns(logits, vocab: int | None) -> int:
    """The cross-entropy ops' vocabulary V: the first `vocab` columns of logits[..., Vp] (None:
    all of them). Columns V..Vp-1 are the LM head's padding (crystal.model.ParamLayout)."""
    Vp = logits.shape[-1]
    V = Vp if vocab is None else int(vocab)
    if not 0 < V <= Vp:
        raise ValueError(f"vocabulary {V} outside the logits' {Vp} columns")
    return V


class Backend(Protocol):
    name: str

    # memory
    def empty(self, shape, dtype="float32") -> Array: ...
    def zeros(self, shape, dtype="float32") -> Array: ...
    def to_device(self, host_array) -> Array: ...
    def to_host(self, array) -> Any: ...
    # micro-batches [(x, y) host int32 [B,T]] -> [(idx, targets)] on the device, in the calling
    # thread's fixed input buffers (cuda: with their token buckets and dropout keys, keys[k] =
    # Dropout.keys(n_layer) of batch k, in one copy; valid until the thread's next stage)
    def stage(self, batches, vocab_size: int, keys=None) -> list: ...
    warm: bool  # every kernel compiled (crystal.model.warm_up sets it)
    def synchronize(self) -> None: ...  # the calling thread's work is done
    act_dtype: Any  # dtype of activations and their gradients: float32, or bf16 storage
    # the buffer the forward and backward read the weights from: flat itself, or a bf16 copy
    # (out: an existing copy to refresh from flat, e.g. after the sharded optimizer's all-gather)
    def compute_weights(self, flat, out=None) -> Array: ...
    def sphere_context(self, index: int): ...  # context manager a sphere thread runs inside
    def zero(self, x) -> None: ...  # x[...] = 0
    def record_event(self): ...  # marks the calling thread's work so far (None on cpu)
    def wait_event(self, event) -> None: ...  # the calling thread's later work waits for it

    # out[b,t] = wte[idx[b,t]] + wpe[t] (wpe None: no position embeddings, Llama)
    def encoder_forward(self, out, idx, wte, wpe) -> None: ...
    # dwte[idx[b,t]] += dout[b,t] in (b,t) order; dwpe[t] = sum_b dout[b,t] (dwpe may be None;
    # dwte: the V real rows, a view of the padded gradient; its row count is the vocabulary
    # `stage` was given; the caller zeroes it first when the LM head is untied)
    def encoder_backward(self, dwte, dwpe, dout, idx) -> None: ...

    # out = (inp - mean) * rstd * w + b over the last axis; saves mean, rstd [N]
    def layernorm_forward(self, out, mean, rstd, inp, w, b, eps: float) -> None: ...
    # dinp += ...; dw, db written (both None: a frozen LayerNorm, dinp alone)
    def layernorm_backward(self, dinp, dw, db, dout, inp, w, mean, rstd) -> None: ...
    # Llama's RMSNorm: out = w * x * rstd, rstd = 1/sqrt(mean(x^2) + eps) saved [N] (float32)
    def rmsnorm_forward(self, out, rstd, inp, w, eps: float) -> None: ...
    # xhat = x rstd, dxhat = dout w: dinp += rstd (dxhat - xhat mean(dxhat xhat)); dw = sum_rows dout xhat (written)
    def rmsnorm_backward(self, dinp, dw, dout, inp, w, rstd) -> None: ...

    # out[N,OC] = inp[N,C] @ w[C,OC] + bias (Conv1D layout); bias may be None
    def matmul_forward(self, out, inp, w, bias) -> None: ...
    # pre = inp @ w + bias, out = gelu(pre) (one fused product where the backend has it)
    def matmul_gelu_forward(self, out, pre, inp, w, bias) -> None: ...
    # dinp = dout @ w.T, dw = inp.T @ dout, dbias = sum_rows dout (all written; dw None: a frozen
    # weight, no weight product; dbias may be None)
    def matmul_backward(self, dinp, dw, dbias, dout, inp, w) -> None: ...
    # out[:, lo:lo+OC] += inp[N,C] @ w[C,OC], out [N,W] (LoRA's B on a column block of a fused
    # product: a llama's q|k|v, gate|up), the block read and written in place (leading dimension W)
    def matmul_columns_forward(self, out, inp, w, lo: int) -> None: ...
    # d = dout[:, lo:lo+OC] of dout [N,W]: dinp = d @ w.T, dw = inp.T @ d (both written)
    def matmul_columns_backward(self, dinp, dw, dout, inp, w, lo: int) -> None: ...
    # out[N,OC] = inp[N,C] @ w[OC,C].T + bias (nn.Linear layout, Llama); bias may be None
    def linear_forward(self, out, inp, w, bias) -> None: ...
    # dinp = dout @ w, dw = dout.T @ inp, dbias = sum_rows dout (all written; dw, dbias may be None)
    def linear_backward(self, dinp, dw, dbias, dout, inp, w) -> None: ...
    # logits[N,Vp] = inp[N,C] @ wte.T  (the LM head: linear_forward without bias; wte the tied
    # token embedding or an untied lm_head, its padded rows too)
    def lm_head_forward(self, logits, inp, wte) -> None: ...
    # dinp = dlogits @ wte, dwte = dlogits.T @ inp (written; None: a frozen head, no product)
    def lm_head_backward(self, dinp, dwte, dlogits, inp, wte) -> None: ...

    # (shape, dtype) of what attention_forward saves for the backward: the probabilities
    # [B,NH,T,T], or flash attention's softmax statistics [B,NH,T] (float32)
    def attention_saved(self, B: int, n_head: int, T: int, head_size: int) -> tuple: ...
    # causal self-attention of qkv[B,T,(NH + 2 KV) hd] = [q heads | k heads | v heads] (GPT-2:
    # KV = NH, [B,T,3C]) -> out[B,T,NH*hd], scale 1/sqrt(hd); n_kv_head KV (None: n_head) divides
    # NH and query head h reads KV head h // (NH // KV), in place (K/V never copied per head);
    # saves att (see attention_saved); drop: None or (key, threshold, scale), dropout on the
    # probabilities (y = dropout(att) v)
    def attention_forward(self, out, att, qkv, n_head: int, drop=None, *, n_kv_head: int | None = None) -> None: ...
    # dqkv written from dout, qkv, the saved att and the forward's output (with its drop); a KV
    # head's dk, dv sum its query heads' terms in ascending h
    def attention_backward(self, dqkv, dout, qkv, att, n_head: int, drop=None, *, out=None,
                           n_kv_head: int | None = None) -> None: ...
    # rotary embeddings (Hugging Face rotate-half), in place on the NH q and KV k heads of qkv;
    # cos, sin float32 [T, hd/2] (row t: position t); x1 = x[d], x2 = x[d + hd/2]:
    # x[d] = x1 cos - x2 sin, x[d + hd/2] = x2 cos + x1 sin; v heads untouched
    def rope_forward(self, qkv, cos, sin, n_head: int, n_kv_head: int) -> None: ...
    # in place, the transpose: dx1 = dy1 cos + dy2 sin, dx2 = dy2 cos - dy1 sin
    def rope_backward(self, dqkv, cos, sin, n_head: int, n_kv_head: int) -> None: ...

    # out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    def gelu_forward(self, out, inp) -> None: ...
    # dinp = gelu'(inp) * dout (dinp may alias dout)
    def gelu_backward(self, dinp, inp, dout) -> None: ...

    # SwiGLU of gu[N,2I] = [gate | up] per row: out[N,I] = silu(gate) up, silu(x) = x sigmoid(x)
    def swiglu_forward(self, out, gu) -> None: ...
    # dgate = dout up s (1 + gate (1 - s)), dup = dout silu(gate), s = sigmoid(gate) (dgu written, not aliasing gu)
    def swiglu_backward(self, dgu, gu, dout) -> None: ...

    # out = a + b
    def residual_forward(self, out, a, b) -> None: ...
    # res = a + b, then out = layernorm(res) saving mean, rstd (one pass where the backend fuses it)
    def residual_layernorm_forward(self, res, out, mean, rstd, a, b, w, bias, eps: float) -> None: ...
    # res = a + b, then out = rmsnorm(res) saving rstd
    def residual_rmsnorm_forward(self, res, out, rstd, a, b, w, eps: float) -> None: ...
    # out = inp * keep * scale, keep from crystal.dropout's hash of (key, i); out may be inp
    def dropout(self, out, inp, key: int, threshold: int, scale: float) -> None: ...

    # Over logits[N,Vp] whose first `vocab` columns are the vocabulary (vocab_columns: None, all
    # Vp); the columns after it (the LM head's padding) get probability 0 and gradient 0 (written).
    # probs[N,:V] = softmax(logits[:, :V]) (may alias logits); losses[N] = -log probs[target].
    # A target < 0 is ignored (crystal.data.IGNORE, a prompt token): its loss and its dlogits row are 0
    def crossentropy_forward(self, losses, probs, logits, targets, vocab: int | None = None) -> None: ...
    # losses as crossentropy_forward and dlogits = (softmax - onehot(target)) * dloss, in one op
    # (dlogits may alias logits)
    def crossentropy_forward_backward(self, losses, dlogits, logits, targets, dloss: float,
                                      vocab: int | None = None) -> None: ...
    # dlogits = (probs - onehot(target)) * dloss (may alias probs)
    def crossentropy_backward(self, dlogits, probs, targets, dloss: float, vocab: int | None = None) -> None: ...
    # sum of losses in index order, as a Python float (or into out[0], a float64 array: nothing read back)
    def sum_losses(self, losses, out=None) -> float | None: ...

    # reducer and optimizer, over flat float32 buffers
    def add_inplace(self, acc, x) -> None: ...  # acc += x
    def scale_inplace(self, x, s: float) -> None: ...  # x *= s
    def sum_squares(self, x) -> float: ...  # sum x^2 in float64, fixed order
    # the reducer's tree on [start, end): slots[dst] += slots[src] for each (dst, src) row of
    # pairs [K,2] (a host int64 array) in order, then slots[0] *= inv_m; returns the sum of squares of slots[0] there
    def reduce_slots(self, slots, pairs, start: int, end: int, inv_m: float) -> float: ...
    # AdamW on params[start:end]; ranges: host int64 [K,3] rows (start, end, decay 0/1) that
    # cover [start, end) contiguously (the optimizer passes one chunk at a time); compute: the
    # weights the spheres read (compute_weights(params)), refreshed on the same range in the same pass
    def adamw_update(self, params, grads, m, v, ranges, scalars: AdamWScalars, compute=None) -> None: ...
    # Muon (crystal.muon), float32: on the (start, end) rows of ranges (host int64 [K,2+]),
    # m = momentum m + (1-momentum) g with g = grad_scale grads, and grads <- the update
    # (Nesterov: momentum m + (1-momentum) g; else m)
    def muon_momentum(self, m, grads, ranges, momentum: float, nesterov: bool, grad_scale: float) -> None: ...
    # one matrix: p = p decay - step_size NS(u), NS the quintic Newton-Schulz orthogonalization
    # (coeffs (a, b, c), `steps` iterations, on the wide orientation); p, u 2-D views of the flat
    # buffers (rows may be strided); u is scratch afterwards (a bf16 weight copy is the caller's to refresh)
    def muon_orthogonal_update(self, p, u, steps: int, coeffs, decay: float, step_size: float) -> None: ...
