"""AdamW, the learning-rate schedule, clipping and the reducer."""

import dataclasses

import numpy as np
import pytest

from crystal.backends.cpu import CpuBackend
from crystal.config import ModelConfig, TrainConfig
from crystal.model import ParamLayout, init_params
from crystal.optim import AdamW, clip_scale, lr_at
from crystal.reducer import GradientReducer, norm_of, tree_pairs

be = CpuBackend()


def test_lr_warms_up_linearly_then_decays_by_cosine_to_a_tenth():
    cfg = TrainConfig(lr=1e-3, warmup=10, steps=110)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(109, cfg) == pytest.approx(1e-4)
    mid = lr_at(10 + 99 // 2, cfg)
    assert 1e-4 < mid < 1e-3
    lrs = [lr_at(s, cfg) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_min_lr_sets_the_end_of_the_decay():
    cfg = TrainConfig(lr=1e-3, min_lr=0.0, warmup=0, steps=50)
    assert lr_at(49, cfg) == pytest.approx(0.0, abs=1e-12)


def test_clipping_scales_only_norms_above_the_limit():
    assert clip_scale(0.5, 1.0) == 1.0
    assert clip_scale(4.0, 1.0) == pytest.approx(0.25, rel=1e-5)
    assert clip_scale(4.0, 0.0) == 1.0


def test_weight_decay_applies_to_two_dimensional_tensors_only():
    layout = ParamLayout(ModelConfig(vocab_size=11, block_size=5, n_layer=2, n_head=2, n_embd=6))
    ranges = layout.decay_ranges()
    assert ranges[0, 0] == 0 and ranges[-1, 1] == layout.size
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous cover
    decayed = np.zeros(layout.size, dtype=bool)
    for start, end, decay in ranges:
        decayed[start:end] = bool(decay)
    for s in layout.specs:
        assert decayed[s.offset:s.offset + s.size].all() == (len(s.shape) == 2)
        assert decayed[s.offset:s.offset + s.size].any() == (len(s.shape) == 2)


def test_adamw_matches_pytorch_adamw():
    torch = pytest.importorskip("torch")
    mcfg = ModelConfig(vocab_size=13, block_size=6, n_layer=1, n_head=2, n_embd=10)
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8)
    layout = ParamLayout(mcfg)
    flat = init_params(mcfg, 0)
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(layout.size).astype(np.float32) for _ in range(5)]

    opt = AdamW(be, layout, cfg)
    params = flat.copy()
    for g in grads:
        opt.step(params, g, cfg.lr)

    tp = {s.name: torch.tensor(v.copy(), requires_grad=True) for s, v in
          zip(layout.specs, layout.views(flat.copy()).values())}
    groups = [
        {"params": [tp[s.name] for s in layout.specs if s.decay], "weight_decay": cfg.weight_decay},
        {"params": [tp[s.name] for s in layout.specs if not s.decay], "weight_decay": 0.0},
    ]
    topt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    for g in grads:
        for name, gv in layout.views(g).items():
            tp[name].grad = torch.tensor(gv.copy())
        topt.step()
    for name, v in layout.views(params).items():
        np.testing.assert_allclose(v, tp[name].detach().numpy(), rtol=2e-5, atol=2e-6)


def test_adamw_grad_scale_equals_scaling_the_gradient():
    mcfg = ModelConfig(vocab_size=13, block_size=6, n_layer=1, n_head=2, n_embd=10)
    layout, cfg = ParamLayout(mcfg), TrainConfig()
    g = np.random.default_rng(1).standard_normal(layout.size).astype(np.float32)
    a, b = init_params(mcfg, 0), init_params(mcfg, 0)
    AdamW(be, layout, cfg).step(a, g, 1e-3, grad_scale=0.5)
    AdamW(be, layout, cfg).step(b, g * np.float32(0.5), 1e-3)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 12, 13])
def test_reducer_tree_adds_every_slot_exactly_once(n):
    holds = [{i} for i in range(n)]  # which slots' values each slot holds
    for dst, src in tree_pairs(n):
        assert holds[dst].isdisjoint(holds[src])
        holds[dst] |= holds[src]
    assert holds[0] == set(range(n))


def test_reducer_returns_the_mean_gradient():
    red = GradientReducer(be, 1000, 5)
    vals = np.random.default_rng(2).standard_normal((5, 1000)).astype(np.float32)
    for j in range(5):
        red.put(j, vals[j])
    norm = red.reduce()
    np.testing.assert_allclose(red.grad, vals.mean(0), rtol=1e-5, atol=1e-6)
    assert norm == pytest.approx(float(np.linalg.norm(vals.mean(0).astype(np.float64))), rel=1e-5)
    assert red.reduce_losses([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(3.0)


def test_reducer_sum_order_is_a_fixed_tree_not_sequential():
    red = GradientReducer(be, 1, 4)
    for j, v in enumerate([1e8, 1.0, -1e8, 1.0]):
        red.put(j, np.array([v], dtype=np.float32))
    # tree: (1e8 + 1) + (-1e8 + 1) in float32 = 1e8 + -1e8 = 0; sequential would give 1
    red.reduce()
    assert float(red.grad[0]) == 0.0


def test_reducing_chunk_by_chunk_in_any_order_gives_the_same_gradient_and_norm():
    vals = np.random.default_rng(3).standard_normal((7, 5000)).astype(np.float32)
    a, b = GradientReducer(be, 5000, 7), GradientReducer(be, 5000, 7)
    for j in range(7):
        a.put(j, vals[j])
        b.put(j, vals[j])
    norm_a = a.reduce()
    partial = {c: b.reduce_chunk(c) for c in reversed(range(len(b.chunks)))}
    assert norm_of([partial[c] for c in range(len(b.chunks))]) == norm_a
    assert a.grad.tobytes() == b.grad.tobytes()


def test_train_config_is_a_frozen_dataclass():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().lr = 1.0
