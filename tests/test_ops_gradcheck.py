"""Each op's backward equals central finite differences of its forward (float64, odd shapes).

For an op y = f(x), the check uses the scalar L = sum(y * R) with a fixed random R: the
backward with dout = R must equal dL/dx estimated by (L(x + h) - L(x - h)) / 2h.
"""

import numpy as np
import pytest

from crystal.backends.cpu import CpuBackend

be = CpuBackend()
B, T, C, NH, V = 2, 5, 6, 3, 7
H = 1e-6


def numeric_grad(loss, x, h=H):
    """Central differences of loss() with respect to every element of x (in place)."""
    g = np.zeros_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        up = loss()
        flat[i] = old - h
        down = loss()
        flat[i] = old
        gflat[i] = (up - down) / (2 * h)
    return g


def assert_close(analytic, numeric, tol=1e-6):
    scale = max(np.abs(numeric).max(), 1e-12)
    assert np.abs(analytic - numeric).max() / scale < tol


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def test_encoder_backward_matches_finite_differences(rng):
    wte, wpe = rng.standard_normal((V, C)), rng.standard_normal((T + 2, C))
    idx = rng.integers(0, V, (B, T)).astype(np.int32)
    idx[0, 0] = idx[1, 3]  # a repeated token accumulates into one row
    R, out = rng.standard_normal((B, T, C)), np.empty((B, T, C))

    def loss():
        be.encoder_forward(out, idx, wte, wpe[:T])
        return float((out * R).sum())

    dwte, dwpe = np.zeros_like(wte), np.full_like(wpe, np.nan)  # dwpe must be fully written
    be.encoder_backward(dwte, dwpe, R, idx)
    assert_close(dwte, numeric_grad(loss, wte))
    assert_close(dwpe, numeric_grad(loss, wpe))


def test_layernorm_backward_matches_finite_differences(rng):
    x = rng.standard_normal((B, T, C))
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    R = rng.standard_normal((B, T, C))
    out, mean, rstd = np.empty((B, T, C)), np.empty((B, T)), np.empty((B, T))

    def loss():
        be.layernorm_forward(out, mean, rstd, x, w, b, 1e-5)
        return float((out * R).sum())

    loss()
    dx, dw, db = np.zeros_like(x), np.full_like(w, np.nan), np.full_like(b, np.nan)
    be.layernorm_backward(dx, dw, db, R, x, w, mean, rstd)
    assert_close(dw, numeric_grad(loss, w))
    assert_close(db, numeric_grad(loss, b))
    assert_close(dx, numeric_grad(loss, x))


def test_layernorm_backward_accumulates_into_dinp(rng):
    x, w, b, R = (rng.standard_normal(s) for s in ((B, T, C), C, C, (B, T, C)))
    out, mean, rstd = np.empty((B, T, C)), np.empty((B, T)), np.empty((B, T))
    be.layernorm_forward(out, mean, rstd, x, w, b, 1e-5)
    dx0 = np.zeros_like(x)
    be.layernorm_backward(dx0, np.empty(C), np.empty(C), R, x, w, mean, rstd)
    dx1 = np.ones_like(x)
    be.layernorm_backward(dx1, np.empty(C), np.empty(C), R, x, w, mean, rstd)
    np.testing.assert_allclose(dx1, dx0 + 1, rtol=1e-12, atol=1e-12)


def test_matmul_backward_matches_finite_differences(rng):
    OC = 5
    x, w, bias = rng.standard_normal((B, T, C)), rng.standard_normal((C, OC)), rng.standard_normal(OC)
    R, out = rng.standard_normal((B, T, OC)), np.empty((B, T, OC))

    def loss():
        be.matmul_forward(out, x, w, bias)
        return float((out * R).sum())

    dx, dw, db = (np.full_like(a, np.nan) for a in (x, w, bias))
    be.matmul_backward(dx, dw, db, R, x, w)
    assert_close(dx, numeric_grad(loss, x))
    assert_close(dw, numeric_grad(loss, w))
    assert_close(db, numeric_grad(loss, bias))


def test_lm_head_backward_matches_finite_differences(rng):
    x, wte = rng.standard_normal((B, T, C)), rng.standard_normal((V, C))
    R, logits = rng.standard_normal((B, T, V)), np.empty((B, T, V))

    def loss():
        be.lm_head_forward(logits, x, wte)
        return float((logits * R).sum())

    dx, dwte = np.full_like(x, np.nan), np.full_like(wte, np.nan)
    be.lm_head_backward(dx, dwte, R, x, wte)
    assert_close(dx, numeric_grad(loss, x))
    assert_close(dwte, numeric_grad(loss, wte))


def test_attention_backward_matches_finite_differences(rng):
    qkv = rng.standard_normal((B, T, 3 * C))
    R = rng.standard_normal((B, T, C))
    out, att = np.empty((B, T, C)), np.empty((B, NH, T, T))

    def loss():
        be.attention_forward(out, att, qkv, NH)
        return float((out * R).sum())

    loss()
    dqkv = np.full_like(qkv, np.nan)
    be.attention_backward(dqkv, R, qkv, att, NH)
    assert_close(dqkv, numeric_grad(loss, qkv))


def test_attention_backward_with_dropout_on_the_probabilities_matches_finite_differences(rng):
    from crystal.dropout import Dropout

    drop = Dropout(0.3, 1, 2, 0).site(0, 3)
    qkv = rng.standard_normal((B, T, 3 * C))
    R = rng.standard_normal((B, T, C))
    out, att = np.empty((B, T, C)), np.empty((B, NH, T, T))

    def loss():
        be.attention_forward(out, att, qkv, NH, drop)
        return float((out * R).sum())

    plain = np.empty((B, T, C))
    be.attention_forward(plain, np.empty((B, NH, T, T)), qkv, NH)
    assert not np.allclose(plain, (loss(), out)[1])  # the mask changes the output
    dqkv = np.full_like(qkv, np.nan)
    be.attention_backward(dqkv, R, qkv, att, NH, drop)
    assert_close(dqkv, numeric_grad(loss, qkv))


def test_attention_is_causal(rng):
    qkv = rng.standard_normal((B, T, 3 * C))
    out1, out2, att = np.empty((B, T, C)), np.empty((B, T, C)), np.empty((B, NH, T, T))
    be.attention_forward(out1, att, qkv, NH)
    assert np.all(np.triu(att[0, 0], 1) == 0)
    np.testing.assert_allclose(att.sum(-1), 1.0, rtol=1e-12)
    qkv[:, -1] += 1.0  # changing the last position leaves earlier outputs untouched
    be.attention_forward(out2, att, qkv, NH)
    np.testing.assert_array_equal(out1[:, :-1], out2[:, :-1])


def test_gelu_backward_matches_finite_differences(rng):
    x = rng.standard_normal((B, T, 4 * C)) * 3
    R, out = rng.standard_normal(x.shape), np.empty(x.shape)

    def loss():
        be.gelu_forward(out, x)
        return float((out * R).sum())

    dx = np.empty_like(x)
    be.gelu_backward(dx, x, R)
    assert_close(dx, numeric_grad(loss, x))


def test_gelu_backward_may_run_in_place(rng):
    x, R = rng.standard_normal(50), rng.standard_normal(50)
    expected = np.empty(50)
    be.gelu_backward(expected, x, R)
    be.gelu_backward(R, x, R)
    np.testing.assert_array_equal(R, expected)


def test_residual_forward_adds(rng):
    a, b, out = rng.standard_normal((B, T, C)), rng.standard_normal((B, T, C)), np.empty((B, T, C))
    be.residual_forward(out, a, b)
    np.testing.assert_array_equal(out, a + b)


def test_crossentropy_backward_matches_finite_differences(rng):
    logits = rng.standard_normal((B, T, V)) * 2
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    probs, losses = np.empty((B, T, V)), np.empty((B, T))

    def loss():
        be.crossentropy_forward(losses, probs, logits, targets)
        return be.sum_losses(losses) / (B * T)

    loss()
    dlogits = np.empty_like(logits)
    be.crossentropy_backward(dlogits, probs, targets, 1.0 / (B * T))
    assert_close(dlogits, numeric_grad(loss, logits))


def test_crossentropy_is_stable_for_large_logits():
    logits = np.array([[1000.0, 0.0, -1000.0]])
    losses, probs = np.empty(1), np.empty((1, 3))
    be.crossentropy_forward(losses, probs, logits, np.array([0], dtype=np.int32))
    assert losses[0] == pytest.approx(0.0, abs=1e-12)
    assert np.isfinite(probs).all()
