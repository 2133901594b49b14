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


# --- RMSNorm (transformers' LlamaRMSNorm) -------------------------------------------------------

def llama_rmsnorm(C, w, eps):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(C, eps=eps).double()
    with torch.no_grad():
        norm.weight.copy_(torch.tensor(w, dtype=torch.float64))
    return norm


def test_rmsnorm_matches_llama_rmsnorm(rng):
    C, eps = 24, 1e-5
    x, w, dout = randn(rng, B, T, C) * 3, randn(rng, C), randn(rng, B, T, C)
    out, rstd = np.empty_like(x), np.empty((B, T), np.float32)
    be.rmsnorm_forward(out, rstd, x, w, eps)
    norm, xt = llama_rmsnorm(C, w, eps), leaf(x)
    ref = norm(xt)
    ref.backward(torch.tensor(dout, dtype=torch.float64))
    assert rel_err(out, ref.detach().numpy()) <= TOL
    assert rel_err(rstd, 1 / np.sqrt((x.astype(np.float64) ** 2).mean(-1) + eps)) <= 1e-6
    dinp = randn(rng, B, T, C)  # accumulated into
    dinp0, dw = dinp.copy(), np.full_like(w, np.nan)  # dw written
    be.rmsnorm_backward(dinp, dw, dout, x, w, rstd)
    assert rel_err(dinp - dinp0, grad_of(xt)) <= TOL
    assert rel_err(dw, norm.weight.grad.numpy()) <= TOL


def test_residual_rmsnorm_is_the_sum_then_rmsnorm_bitwise(rng):
    C, eps = 24, 1e-6
    a, b, w = randn(rng, B, T, C), randn(rng, B, T, C), randn(rng, C)
    res, out, rstd = np.empty_like(a), np.empty_like(a), np.empty((B, T), np.float32)
    be.residual_rmsnorm_forward(res, out, rstd, a, b, w, eps)
    out2, rstd2 = np.empty_like(a), np.empty_like(rstd)
    be.rmsnorm_forward(out2, rstd2, a + b, w, eps)
    assert res.tobytes() == (a + b).tobytes() and out.tobytes() == out2.tobytes() and rstd.tobytes() == rstd2.tobytes()


def test_rmsnorm_backward_matches_finite_differences(rng):
    C, eps = 6, 1e-5
    x, w, R = (randn(rng, *s, dtype=np.float64) for s in ((B, 5, C), (C,), (B, 5, C)))
    out, rstd = np.empty_like(x), np.empty((B, 5))

    def loss():
        be.rmsnorm_forward(out, rstd, x, w, eps)
        return float((out * R).sum())

    loss()
    dx, dw = np.zeros_like(x), np.full_like(w, np.nan)
    be.rmsnorm_backward(dx, dw, R, x, w, rstd)
    assert_close(dx, numeric_grad(loss, x))
    assert_close(dw, numeric_grad(loss, w))


# --- rotary embeddings (transformers' apply_rotary_pos_emb, cos/sin from LlamaRotaryEmbedding) ---

ROPE_SCALINGS = {
    "default": {},
    "llama3": dict(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
}


def llama_rope_tables(hd, positions, scaling):
    """transformers' cos, sin [positions, hd] (float32) for a config with this head size."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=4 * hd, num_attention_heads=4, num_key_value_heads=2, head_dim=hd,
                      max_position_embeddings=32, **ROPE_SCALINGS[scaling])
    cos, sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1), torch.arange(positions)[None])
    return cos[0], sin[0]


@pytest.mark.parametrize("scaling", sorted(ROPE_SCALINGS))
def test_rope_matches_transformers_apply_rotary_pos_emb(rng, scaling):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    NH, KV, hd = 4, 2, 16
    cos, sin = llama_rope_tables(hd, 12, scaling)
    cos, sin = cos[:T], sin[:T]  # the caller's slice of its [block_size, hd] table
    half = lambda t: np.ascontiguousarray(t[:, :hd // 2].numpy())  # crystal keeps [T, hd/2]: both halves are equal
    assert torch.equal(cos[:, :hd // 2], cos[:, hd // 2:])
    qkv, dout = randn(rng, B, T, (NH + 2 * KV) * hd), randn(rng, B, T, (NH + 2 * KV) * hd)
    x = qkv.copy()
    be.rope_forward(x, half(cos), half(sin), NH, KV)

    q, k = leaf(qkv[..., :NH * hd]), leaf(qkv[..., NH * hd:(NH + KV) * hd])
    heads = lambda a, n: a.reshape(B, T, n, hd).transpose(1, 2)
    rq, rk = apply_rotary_pos_emb(heads(q, NH), heads(k, KV), cos.double()[None], sin.double()[None])
    ref = torch.cat([rq.transpose(1, 2).reshape(B, T, -1), rk.transpose(1, 2).reshape(B, T, -1)], -1)
    assert rel_err(x[..., :(NH + KV) * hd], ref.detach().numpy()) <= TOL
    assert x[..., (NH + KV) * hd:].tobytes() == qkv[..., (NH + KV) * hd:].tobytes()  # v heads untouched

    ref.backward(torch.tensor(dout[..., :(NH + KV) * hd], dtype=torch.float64))
    d = dout.copy()
    be.rope_backward(d, half(cos), half(sin), NH, KV)
    assert rel_err(d[..., :NH * hd], grad_of(q)) <= TOL
    assert rel_err(d[..., NH * hd:(NH + KV) * hd], grad_of(k)) <= TOL
    assert d[..., (NH + KV) * hd:].tobytes() == dout[..., (NH + KV) * hd:].tobytes()


def test_rope_backward_matches_finite_differences(rng):
    NH, KV, hd, Tq = 2, 1, 4, 5
    theta = rng.uniform(0, 6, (Tq, hd // 2))
    cos, sin = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
    x0, R = randn(rng, B, Tq, (NH + 2 * KV) * hd, dtype=np.float64), randn(rng, B, Tq, (NH + 2 * KV) * hd, dtype=np.float64)

    def loss():
        y = x0.copy()
        be.rope_forward(y, cos, sin, NH, KV)
        return float((y * R).sum())

    d = R.copy()
    be.rope_backward(d, cos, sin, NH, KV)
    assert_close(d, numeric_grad(loss, x0))


def test_rope_refuses_tables_shorter_than_the_sequence(rng):
    qkv = randn(rng, B, T, 4 * 8)
    with pytest.raises(ValueError, match="rotary tables"):
        be.rope_forward(qkv, np.ones((T - 1, 4), np.float32), np.ones((T - 1, 4), np.float32), 2, 1)


# --- SwiGLU: out = silu(gate) * up from gu = [gate | up] ---------------------------------------

def test_swiglu_matches_torch(rng):
    I = 11
    gu, dout = randn(rng, B, T, 2 * I) * 4, randn(rng, B, T, I)
    gu[0, 0, :3] = (-100.0, 100.0, 0.0)  # saturated sigmoids stay finite
    out, dgu = np.empty((B, T, I), np.float32), np.full_like(gu, np.nan)
    be.swiglu_forward(out, gu)
    be.swiglu_backward(dgu, gu, dout)
    t = leaf(gu)
    ref = F.silu(t[..., :I]) * t[..., I:]
    ref.backward(torch.tensor(dout, dtype=torch.float64))
    assert rel_err(out, ref.detach().numpy()) <= TOL
    assert rel_err(dgu, grad_of(t)) <= TOL


# --- linear products in nn.Linear layout (w[OC, C]), bias optional, dw optional ------------------

@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_matches_torch_f_linear(rng, with_bias):
    C, OC = 20, 13
    x, w, dout = randn(rng, B, T, C), randn(rng, OC, C), randn(rng, B, T, OC)
    bias = randn(rng, OC) if with_bias else None
    out = np.empty((B, T, OC), np.float32)
    be.linear_forward(out, x, w, bias)
    dx, dw, db = np.full_like(x, np.nan), np.full_like(w, np.nan), np.full(OC, np.nan, np.float32)
    be.linear_backward(dx, dw, db if with_bias else None, dout, x, w)
    xt, wt = leaf(x), leaf(w)
    bt = leaf(bias) if with_bias else None
    ref = F.linear(xt, wt, bt)
    ref.backward(torch.tensor(dout, dtype=torch.float64))
    assert rel_err(out, ref.detach().numpy()) <= TOL
    assert rel_err(dx, grad_of(xt)) <= TOL
    assert rel_err(dw, grad_of(wt)) <= TOL
    if with_bias:
        assert rel_err(db, grad_of(bt)) <= TOL


def test_frozen_weights_get_only_dinp(rng):
    # dw = None (a frozen weight, LoRA): dinp bitwise as with the weight gradient, nothing else computed
    C, OC = 20, 13
    x, dout = randn(rng, B, T, C), randn(rng, B, T, OC)
    for op, w in ((be.linear_backward, randn(rng, OC, C)), (be.matmul_backward, randn(rng, C, OC))):
        dx, dx2, dw, db = np.empty_like(x), np.empty_like(x), np.empty_like(w), np.empty(OC, np.float32)
        op(dx, dw, db, dout, x, w)
        op(dx2, None, None, dout, x, w)
        assert dx.tobytes() == dx2.tobytes()


def test_lm_head_is_linear_without_bias_bitwise(rng):
    C, V = 16, 37
    x, wte, dl = randn(rng, B * T, C), randn(rng, V, C), randn(rng, B * T, V)
    a, b = np.empty((B * T, V), np.float32), np.empty((B * T, V), np.float32)
    be.lm_head_forward(a, x, wte)
    be.linear_forward(b, x, wte, None)
    da, dwa, db_, dwb = np.empty_like(x), np.empty_like(wte), np.empty_like(x), np.empty_like(wte)
    be.lm_head_backward(da, dwa, dl, x, wte)
    be.linear_backward(db_, dwb, None, dl, x, wte)
    assert (a.tobytes(), da.tobytes(), dwa.tobytes()) == (b.tobytes(), db_.tobytes(), dwb.tobytes())


# --- the encoder without position embeddings (wpe None, dwpe None) -------------------------------

def test_encoder_without_position_embeddings(rng):
    V, C = 9, 8
    wte, dout = randn(rng, V, C), randn(rng, B, T, C)
    idx = rng.integers(0, V, (B, T)).astype(np.int32)
    idx[0, 0] = idx[1, 3]  # a repeated token accumulates into one row
    out = np.empty((B, T, C), np.float32)
    be.encoder_forward(out, idx, wte, None)
    assert out.tobytes() == wte[idx].tobytes()
    dwte = randn(rng, V, C)  # accumulated into (the tied LM head's gradient)
    expected = dwte.astype(np.float64)
    np.add.at(expected, idx.reshape(-1), dout.reshape(-1, C).astype(np.float64))
    be.encoder_backward(dwte, None, dout, idx)
    assert rel_err(dwte, expected) <= 1e-6


# --- fixed reduction orders: the same inputs give the same bits, run to run ----------------------

def test_llama_ops_give_identical_bits_run_to_run(rng):
    NH, KV, hd, C, I = 4, 2, 8, 24, 13
    qkv, dqo = randn(rng, B, T, (NH + 2 * KV) * hd), randn(rng, B, T, NH * hd)
    x, w, dx = randn(rng, B, T, C), randn(rng, C), randn(rng, B, T, C)
    gu, dsw = randn(rng, B, T, 2 * I), randn(rng, B, T, I)
    cos, sin = (randn(rng, T, hd // 2) for _ in range(2))

    def run():
        q = qkv.copy()
        be.rope_forward(q, cos, sin, NH, KV)
        _, _, dqkv = crystal_attention(q, NH, KV, dqo, Dropout(0.1, 0, 0, 0).site(0, 3))
        be.rope_backward(dqkv, cos, sin, NH, KV)
        out, rstd, dinp, dw = np.empty_like(x), np.empty((B, T), np.float32), dx.copy(), np.empty_like(w)
        be.rmsnorm_forward(out, rstd, x, w, 1e-5)
        be.rmsnorm_backward(dinp, dw, dx, x, w, rstd)
        sw, dgu = np.empty_like(dsw), np.empty_like(gu)
        be.swiglu_forward(sw, gu)
        be.swiglu_backward(dgu, gu, dsw)
        return b"".join(a.tobytes() for a in (q, dqkv, out, rstd, dinp, dw, sw, dgu))

    assert run() == run()
