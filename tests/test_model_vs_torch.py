"""The whole model against a plain PyTorch GPT-2 built from the same parameters.

Shapes are not powers of two (B=3, T=37, C=48, 3 heads, V=259). crystal runs in float32, the
reference in float64; relative error of a tensor = max |a - b| / max |b|.
"""

import numpy as np
import pytest

from crystal.config import ModelConfig
from crystal.model import GPT, ParamLayout, init_params
from compare import rel_err, worst_rel_err

torch_gpt2 = pytest.importorskip("torch_gpt2", reason="needs torch (the test extra)")

CFG = ModelConfig(vocab_size=259, block_size=40, n_layer=2, n_head=3, n_embd=48)


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(3)
    flat = init_params(CFG, seed=11)
    flat += rng.standard_normal(flat.shape).astype(np.float32) * 0.02  # non-trivial LN/bias values
    flat[slice(*ParamLayout(CFG).padding)] = 0  # the LM head's padding rows are zero
    model = GPT(CFG, flat)
    idx = rng.integers(0, CFG.vocab_size, (3, 37))
    targets = rng.integers(0, CFG.vocab_size, (3, 37))
    loss, grads = model.loss_and_grads(idx, targets)
    ref_loss, ref_grads, ref_logits = torch_gpt2.torch_loss_and_grads(model.params, CFG, idx, targets)
    return model, idx, loss, grads, ref_loss, ref_grads, ref_logits


def test_loss_matches_pytorch(case):
    _, _, loss, _, ref_loss, _, _ = case
    assert abs(loss - ref_loss) / ref_loss <= 1e-5


def test_logits_match_pytorch(case):
    model, idx, *_, ref_logits = case
    assert rel_err(model.logits(idx), ref_logits) <= 1e-5


def test_every_parameter_gradient_matches_pytorch(case):
    _, _, _, grads, _, ref_grads, _ = case
    assert set(grads) == set(ref_grads) == {s.name for s in ParamLayout(CFG).specs}
    worst, err = worst_rel_err(grads, ref_grads)
    assert err <= 1e-4, (worst, err)


def test_gradients_do_not_depend_on_stale_gradient_buffers(case):
    """Every gradient is written (not accumulated), so garbage in the buffer cannot leak in."""
    model, idx, _, grads, *_ = case
    rng = np.random.default_rng(0)
    targets = rng.integers(0, CFG.vocab_size, idx.shape)
    model.loss_and_grads(idx, rng.integers(0, CFG.vocab_size, idx.shape))  # dirty the caches
    _, again = model.loss_and_grads(idx, targets)
    _, fresh = GPT(CFG, model.flat.copy()).loss_and_grads(idx, targets)
    for name in again:
        np.testing.assert_array_equal(again[name], fresh[name])


def test_shorter_sequences_than_block_size_leave_unused_positions_with_zero_gradient(case):
    model, *_ = case
    idx = np.arange(10).reshape(1, 10)
    _, grads = model.loss_and_grads(idx, idx + 1)
    assert np.all(grads["transformer.wpe.weight"][10:] == 0)
