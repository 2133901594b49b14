"""bf16 mixed precision on a real GPU (`pytest -m cuda`; skipped without one).

fp32 master state, bf16 weights copy and activations, cuBLASLt products, cuDNN flash attention
where cuDNN is installed. What must hold: the loss and gradients stay close to fp32's, training
follows fp32's trajectory, and the sphere count never changes the bits (cuBLASLt without split-K
reductions; cuDNN's deterministic backward, see README).
"""

import numpy as np
import pytest

from crystal.config import ModelConfig, resolve
from crystal.model import GPT, ParamLayout, init_params
from crystal.trainer import train

pytestmark = pytest.mark.cuda

CFG = ModelConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=64)


def cosine(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


@pytest.fixture(scope="module")
def models():
    from crystal.backends.cuda import CudaBackend

    rng = np.random.default_rng(5)
    flat = init_params(CFG, 3)
    flat += rng.standard_normal(flat.shape).astype(np.float32) * 0.02
    flat[slice(*ParamLayout(CFG).padding)] = 0  # the LM head's padding rows are zero
    idx = rng.integers(0, CFG.vocab_size, (4, 64))
    targets = rng.integers(0, CFG.vocab_size, (4, 64))
    return GPT(CFG, flat, CudaBackend("fp32")), GPT(CFG, flat, CudaBackend("bf16")), idx, targets


def test_bf16_loss_is_within_2e_2_of_fp32_on_the_same_batch(models):
    fp32, bf16, idx, targets = models
    a, b = fp32.loss(idx, targets), bf16.loss(idx, targets)
    assert abs(a - b) / a <= 2e-2


def test_bf16_gradients_point_where_fp32_gradients_point(models):
    fp32, bf16, idx, targets = models
    _, ga = fp32.loss_and_grads(idx, targets)
    _, gb = bf16.loss_and_grads(idx, targets)
    worst = min(ga, key=lambda k: cosine(gb[k], ga[k]))
    assert cosine(gb[worst], ga[worst]) >= 0.99, worst


def test_fifty_bf16_steps_follow_the_fp32_trajectory_within_two_percent():
    over = dict(device="cuda", steps=50, spheres=4)
    model_cfg, cfg32 = resolve("tiny", train_overrides=over)
    _, cfg16 = resolve("tiny", train_overrides=dict(over, precision="bf16"))
    a, b = train(model_cfg, cfg32).losses, train(model_cfg, cfg16).losses
    assert np.mean([abs(x - y) / y for x, y in zip(b, a)]) <= 0.02
    assert abs(b[-1] - a[-1]) / a[-1] <= 0.02


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_bf16_stream_count_does_not_change_the_result(dropout):
    runs = []
    for spheres in (1, 4):
        model_cfg, cfg = resolve("tiny", train_overrides=dict(device="cuda", precision="bf16", steps=5,
                                                              spheres=spheres, dropout=dropout))
        runs.append(train(model_cfg, cfg))
    assert runs[0].losses == runs[1].losses
    assert runs[0].params.tobytes() == runs[1].params.tobytes()


def test_bf16_runs_the_cublas_attention_path_without_cudnn():
    from crystal.backends.cuda import CudaBackend

    be = CudaBackend("bf16", flash=False)  # as on a machine without cuDNN
    model_cfg, cfg = resolve("tiny", train_overrides=dict(device="cuda", precision="bf16", steps=5))
    _, cfg32 = resolve("tiny", train_overrides=dict(device="cuda", steps=5))
    a, b = train(model_cfg, cfg32).losses, train(model_cfg, cfg, backend=be).losses
    assert max(abs(x - y) / y for x, y in zip(b, a)) <= 2e-2
