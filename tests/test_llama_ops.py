"""The Llama ops of the cpu backend (GQA attention, RoPE, RMSNorm, SwiGLU, nn.Linear products,
the encoder without position embeddings) against torch autograd and transformers' Llama modules.

crystal runs in float32, the reference in float64 (relative error of a tensor: compare.rel_err);
the finite-difference checks run the ops themselves in float64 (test_ops_gradcheck's helpers).
Shapes are small and not powers of two.
"""

import numpy as np
import pytest

from compare import rel_err
from crystal.backends.cpu import CpuBackend
from crystal.dropout import Dropout
from test_ops_gradcheck import assert_close, numeric_grad

torch = pytest.importorskip("torch", reason="needs torch (the test extra)")
F = torch.nn.functional

be = CpuBackend()
B, T = 2, 7
TOL = 1e-5


@pytest.fixture
def rng():
    return np.random.default_rng(29)


def randn(rng, *shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def leaf(a):
    """A float64 torch leaf tensor (requires grad) of a numpy array."""
    return torch.tensor(np.asarray(a, np.float64), requires_grad=True)


def grad_of(t):
    return t.grad.detach().numpy()


# --- attention with n_kv_head (grouped-query: query head h reads KV head h // (NH // KV)) ------

def torch_attention(qkv, NH, KV, dout, keep=None):
    """(out, dqkv) of causal attention on qkv[B,T,(NH + 2 KV) hd] in float64; keep: the scaled
    dropout mask [B,NH,T,T] on the probabilities (then by hand, with repeat_interleave)."""
    x = leaf(qkv)
    Bq, Tq, W = qkv.shape
    hd = W // (NH + 2 * KV)
    heads = lambda a, n: a.reshape(Bq, Tq, n, hd).transpose(1, 2)
    q = heads(x[..., :NH * hd], NH)
    k = heads(x[..., NH * hd:(NH + KV) * hd], KV)
    v = heads(x[..., (NH + KV) * hd:], KV)
    if keep is None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        k, v = (a.repeat_interleave(NH // KV, dim=1) for a in (k, v))  # Hugging Face's repeat_kv order
        s = q @ k.transpose(-1, -2) / hd ** 0.5
        s = s.masked_fill(torch.ones(Tq, Tq, dtype=torch.bool).triu(1), float("-inf"))
        y = (torch.softmax(s, -1) * torch.tensor(keep, dtype=torch.float64)) @ v
    out = y.transpose(1, 2).reshape(Bq, Tq, NH * hd)
    out.backward(torch.tensor(dout, dtype=torch.float64))
    return out.detach().numpy(), grad_of(x)


def crystal_attention(qkv, NH, KV, dout, drop=None):
    Bq, Tq, W = qkv.shape
    hd = W // (NH + 2 * KV)
    out, att = np.empty((Bq, Tq, NH * hd), qkv.dtype), np.empty((Bq, NH, Tq, Tq), qkv.dtype)
    be.attention_forward(out, att, qkv, NH, drop, n_kv_head=KV)
    dqkv = np.full_like(qkv, np.nan)  # every element must be written
    be.attention_backward(dqkv, dout, qkv, att, NH, drop, out=out, n_kv_head=KV)
    return out, att, dqkv


@pytest.mark.parametrize("NH,KV,hd", [(4, 2, 8), (6, 1, 4), (3, 3, 6), (8, 2, 16)])
def test_gqa_attention_matches_torch_sdpa(rng, NH, KV, hd):
    qkv, dout = randn(rng, B, T, (NH + 2 * KV) * hd), randn(rng, B, T, NH * hd)
    out, _, dqkv = crystal_attention(qkv, NH, KV, dout)
    ref_out, ref_dqkv = torch_attention(qkv, NH, KV, dout)
    assert rel_err(out, ref_out) <= TOL
    assert rel_err(dqkv, ref_dqkv) <= TOL


def test_gqa_attention_dropout_on_the_probabilities_matches_torch(rng):
    NH, KV, hd = 4, 2, 8
    drop = Dropout(0.25, 5, 3, 1).site(1, 3)
    qkv, dout = randn(rng, B, T, (NH + 2 * KV) * hd), randn(rng, B, T, NH * hd)
    out, _, dqkv = crystal_attention(qkv, NH, KV, dout, drop)
    keep = np.empty((B, NH, T, T), np.float32)
    be.dropout(keep, np.ones_like(keep), *drop)  # the op's mask: element (b, h, t, t2) of att
    assert 0 < (keep == 0).mean() < 0.5
    ref_out, ref_dqkv = torch_attention(qkv, NH, KV, dout, keep)
    assert rel_err(out, ref_out) <= TOL
    assert rel_err(dqkv, ref_dqkv) <= TOL


def test_gqa_attention_backward_matches_finite_differences(rng):
    NH, KV, hd = 4, 2, 3
    drop = Dropout(0.3, 1, 2, 0).site(0, 3)
    qkv, R = randn(rng, B, 5, (NH + 2 * KV) * hd, dtype=np.float64), randn(rng, B, 5, NH * hd, dtype=np.float64)
    out, att = np.empty(R.shape), np.empty((B, NH, 5, 5))

    def loss():
        be.attention_forward(out, att, qkv, NH, drop, n_kv_head=KV)
        return float((out * R).sum())

    loss()
    dqkv = np.full_like(qkv, np.nan)
    be.attention_backward(dqkv, R, qkv, att, NH, drop, n_kv_head=KV)
    assert_close(dqkv, numeric_grad(loss, qkv))


def test_n_kv_head_equal_to_n_head_is_the_gpt2_op_bitwise(rng):
    NH, hd = 3, 8
    qkv, dout = randn(rng, B, T, 3 * NH * hd), randn(rng, B, T, NH * hd)
    out, att, dqkv = crystal_attention(qkv, NH, NH, dout)
    out2, att2 = np.empty_like(out), np.empty_like(att)
    be.attention_forward(out2, att2, qkv, NH)
    dqkv2 = np.empty_like(qkv)
    be.attention_backward(dqkv2, dout, qkv, att2, NH, out=out2)
    for a, b in ((out, out2), (att, att2), (dqkv, dqkv2)):
        assert a.tobytes() == b.tobytes()


def test_attention_refuses_a_qkv_width_that_does_not_hold_the_heads(rng):
    qkv = randn(rng, B, T, 4 * 8 + 2 * 3 * 8)
    with pytest.raises(ValueError, match="4 query and 3 key/value heads"):
        be.attention_forward(np.empty((B, T, 32), np.float32), np.empty((B, 4, T, T), np.float32), qkv, 4,
                             n_kv_head=3)
