"""Dropout: masks hashed from (seed, step, micro-batch, layer, site, element), the same on every
backend and sphere; the model's gradient under dropout equals PyTorch's under the same masks."""

import dataclasses

import numpy as np
import pytest

from crystal.backends.cpu import CpuBackend
from crystal.config import ModelConfig, resolve
from crystal.dropout import Dropout, for_step, keep_mask
from crystal.errors import CrystalError
from crystal.model import GPT, ParamLayout, init_params
from crystal.trainer import train
from compare import worst_rel_err

CFG = ModelConfig(vocab_size=259, block_size=40, n_layer=2, n_head=3, n_embd=48)
be = CpuBackend()


def test_the_cpu_kernel_drops_exactly_the_reference_mask():
    d = Dropout(0.2, 1337, 7, 3)
    key = d.key(1, 2)
    x = np.random.default_rng(0).standard_normal(10_007).astype(np.float32)
    out = np.empty_like(x)
    be.dropout(out, x, key, d.threshold, d.scale)
    expected = np.where(keep_mask(key, d.threshold, x.size), x * np.float32(d.scale), np.float32(0))
    assert out.tobytes() == expected.tobytes()


def test_about_p_of_the_elements_are_dropped_and_the_rest_scaled():
    for p in (0.1, 0.5):
        d = Dropout(p, 0, 0, 0)
        x = np.ones(200_000, dtype=np.float32)
        be.dropout(x, x, d.key(0, 0), d.threshold, d.scale)  # in place
        assert abs(np.mean(x == 0) - p) < 0.01
        assert set(np.unique(x)) == {np.float32(0), np.float32(1 / (1 - p))}


def test_every_part_of_the_identity_changes_the_mask():
    base = Dropout(0.5, 1, 2, 3)
    variants = [dataclasses.replace(base, seed=9), dataclasses.replace(base, step=9),
                dataclasses.replace(base, micro=9)]
    keys = {base.key(0, 0), base.key(1, 0), base.key(0, 1)} | {v.key(0, 0) for v in variants}
    assert len(keys) == 6
    masks = {keep_mask(k, base.threshold, 256).tobytes() for k in keys}
    assert len(masks) == 6


def test_no_dropout_means_no_dropout_objects():
    assert for_step(0.0, 1, 2, range(4)) is None
    assert [d.micro for d in for_step(0.1, 1, 2, range(2, 5))] == [2, 3, 4]


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(3)
    flat = init_params(CFG, seed=11) + rng.standard_normal(init_params(CFG, 11).shape).astype(np.float32) * 0.02
    flat[slice(*ParamLayout(CFG).padding)] = 0  # the LM head's padding rows are zero
    idx = rng.integers(0, CFG.vocab_size, (3, 37))
    targets = rng.integers(0, CFG.vocab_size, (3, 37))
    return GPT(CFG, flat), idx, targets, Dropout(0.25, 5, 3, 1)


def test_gradients_under_dropout_match_pytorch_with_the_same_masks(case):
    torch_gpt2 = pytest.importorskip("torch_gpt2", reason="needs torch (the test extra)")
    model, idx, targets, drop = case
    loss, grads = model.loss_and_grads(idx, targets, drop)
    ref_loss, ref_grads, _ = torch_gpt2.torch_loss_and_grads(model.params, CFG, idx, targets, drop=drop)
    assert abs(loss - ref_loss) / ref_loss <= 1e-5
    worst, err = worst_rel_err(grads, ref_grads)
    assert err <= 1e-4, (worst, err)


def test_dropout_changes_the_loss_and_evaluation_does_not_drop(case):
    model, idx, targets, drop = case
    plain, _ = model.loss_and_grads(idx, targets)
    dropped, _ = model.loss_and_grads(idx, targets, drop)
    assert dropped != plain
    assert model.loss(idx, targets) == plain


def test_dropout_training_is_bitwise_the_same_for_any_sphere_count():
    runs = []
    for spheres in (1, 3):
        model_cfg, cfg = resolve("tiny", train_overrides=dict(device="cpu", steps=4, spheres=spheres, dropout=0.2))
        runs.append(train(model_cfg, cfg))
    assert runs[0].losses == runs[1].losses
    assert runs[0].params.tobytes() == runs[1].params.tobytes()
    model_cfg, cfg = resolve("tiny", train_overrides=dict(device="cpu", steps=4, spheres=1))
    assert train(model_cfg, cfg).losses != runs[0].losses


def test_a_resumed_dropout_run_draws_the_masks_it_would_have_drawn(tmp_path):
    from crystal.cli import main

    common = ["train", "--preset", "tiny", "--device", "cpu", "--quiet", "--steps", "6", "--dropout", "0.3",
              "--spheres", "2", "--checkpoint-every", "3"]
    assert main([*common, "--out", str(tmp_path / "straight")]) == 0
    assert main([*common, "--out", str(tmp_path / "resumed"), "--stop-at", "3"]) == 0
    assert main(["train", "--resume", str(tmp_path / "resumed"), "--quiet"]) == 0
    a, b = (tmp_path / n / "model.safetensors" for n in ("straight", "resumed"))
    assert a.read_bytes() == b.read_bytes()


def test_the_shakespeare_char_preset_uses_nanogpts_dropout():
    assert resolve("shakespeare-char")[1].dropout == 0.2
    assert resolve("small")[1].dropout == 0.0


@pytest.mark.parametrize("p", [-0.1, 1.0, float("nan")])
def test_a_dropout_outside_zero_to_one_is_refused(p):
    with pytest.raises(CrystalError, match="--dropout"):
        resolve("tiny", train_overrides=dict(dropout=p))
