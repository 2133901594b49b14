"""Cross-backend equivalence on a real GPU (`pytest -m cuda`; skipped without one).

The cuda backend must compute what the cpu backend computes: the same loss and gradients for
the same parameters and batch, the same loss trajectory over training steps, and, like the cpu
backend, bitwise identical results for any number of sphere streams.
"""

import numpy as np
import pytest

from crystal.config import ModelConfig, resolve
from crystal.model import GPT, ParamLayout, init_params
from crystal.trainer import train
from compare import rel_err, worst_rel_err

pytestmark = pytest.mark.cuda

CFG = ModelConfig(vocab_size=259, block_size=40, n_layer=2, n_head=3, n_embd=48)


@pytest.fixture(scope="module")
def pair():
    from crystal.backends.cpu import CpuBackend
    from crystal.backends.cuda import CudaBackend

    rng = np.random.default_rng(5)
    flat = init_params(CFG, 3) + rng.standard_normal(init_params(CFG, 3).shape).astype(np.float32) * 0.02
    flat[slice(*ParamLayout(CFG).padding)] = 0  # the LM head's padding rows are zero
    idx = rng.integers(0, CFG.vocab_size, (3, 37))
    targets = rng.integers(0, CFG.vocab_size, (3, 37))
    cpu = GPT(CFG, flat, CpuBackend())
    gpu = GPT(CFG, flat, CudaBackend("fp32"))
    return cpu, gpu, idx, targets


def test_cuda_loss_matches_cpu(pair):
    cpu, gpu, idx, targets = pair
    a, _ = cpu.loss_and_grads(idx, targets)
    b, _ = gpu.loss_and_grads(idx, targets)
    assert abs(a - b) / abs(a) <= 1e-5


def test_cuda_logits_match_cpu(pair):
    cpu, gpu, idx, _ = pair
    assert rel_err(gpu.logits(idx), cpu.logits(idx)) <= 1e-5


def test_cuda_gradients_match_cpu(pair):
    cpu, gpu, idx, targets = pair
    _, ga = cpu.loss_and_grads(idx, targets)
    _, gb = gpu.loss_and_grads(idx, targets)
    worst, err = worst_rel_err(gb, ga)
    assert err <= 1e-4, (worst, err)


def test_ten_cuda_steps_follow_the_cpu_loss_trajectory():
    model_cfg, cfg_cpu = resolve("tiny", train_overrides=dict(device="cpu", steps=10, spheres=4))
    _, cfg_gpu = resolve("tiny", train_overrides=dict(device="cuda", steps=10, spheres=4))
    a, b = train(model_cfg, cfg_cpu).losses, train(model_cfg, cfg_gpu).losses
    assert max(abs(x - y) / abs(x) for x, y in zip(a, b)) <= 1e-4


def test_cuda_stream_count_does_not_change_the_result():
    runs = []
    for spheres in (1, 4, 12):
        model_cfg, cfg = resolve("tiny", train_overrides=dict(device="cuda", steps=5, spheres=spheres))
        runs.append(train(model_cfg, cfg))
    assert runs[0].losses == runs[1].losses == runs[2].losses
    assert runs[0].params.tobytes() == runs[1].params.tobytes() == runs[2].params.tobytes()


def test_cuda_dropout_drops_what_the_cpu_drops_for_any_stream_count():
    over = dict(steps=5, dropout=0.2)
    model_cfg, cfg_cpu = resolve("tiny", train_overrides=dict(device="cpu", spheres=2, **over))
    cpu = train(model_cfg, cfg_cpu)
    runs = [train(model_cfg, resolve("tiny", train_overrides=dict(device="cuda", spheres=s, **over))[1])
            for s in (1, 3)]
    assert runs[0].losses == runs[1].losses and runs[0].params.tobytes() == runs[1].params.tobytes()
    assert max(abs(x - y) / abs(x) for x, y in zip(cpu.losses, runs[0].losses)) <= 1e-4


def test_tf32_precision_trains_close_to_fp32():
    model_cfg, cfg = resolve("tiny", train_overrides=dict(device="cuda", steps=5, precision="tf32"))
    _, cfg32 = resolve("tiny", train_overrides=dict(device="cuda", steps=5))
    a, b = train(model_cfg, cfg).losses, train(model_cfg, cfg32).losses
    assert max(abs(x - y) / abs(y) for x, y in zip(a, b)) <= 1e-2


def test_cuda_column_sums_match_cpu_and_do_not_depend_on_the_block_size():
    """layernorm's dw, db and the bias gradient: two-stage column sums whose order is fixed by the
    shapes alone (kernels/column_reduce.cuh), here over 1000 rows (16 parts) of 768 columns."""
    from crystal.backends.cpu import CpuBackend
    from crystal.backends.cuda import CudaBackend

    N, C = 1000, 768
    rng = np.random.default_rng(11)
    dout, inp = (rng.standard_normal((N, C)).astype(np.float32) for _ in range(2))
    w = np.ones(C, np.float32)
    cpu = CpuBackend()
    mean, rstd = np.empty(N, np.float32), np.empty(N, np.float32)
    cpu.layernorm_forward(np.empty((N, C), np.float32), mean, rstd, inp, w, np.zeros(C, np.float32), 1e-5)
    expected = [np.empty(C, np.float32) for _ in range(3)]
    cpu.layernorm_backward(np.zeros((N, C), np.float32), expected[0], expected[1], dout, inp, w, mean, rstd)
    cpu.matmul_backward(np.empty((N, C), np.float32), np.empty((C, C), np.float32), expected[2], dout, inp,
                        np.eye(C, dtype=np.float32))
    runs = []
    for block in (64, 256):
        gpu = CudaBackend("fp32", block=block)
        d = {k: gpu.to_device(v) for k, v in dict(dout=dout, inp=inp, w=w, mean=mean, rstd=rstd).items()}
        dw, db, dbias = (gpu.empty((C,)) for _ in range(3))
        gpu.layernorm_backward(gpu.zeros((N, C)), dw, db, d["dout"], d["inp"], d["w"], d["mean"], d["rstd"])
        gpu.matmul_backward(gpu.empty((N, C)), gpu.empty((C, C)), dbias, d["dout"], d["inp"],
                            gpu.to_device(np.eye(C, dtype=np.float32)))
        runs.append([gpu.to_host(x) for x in (dw, db, dbias)])
    assert all(rel_err(x, e) <= 1e-5 for x, e in zip(runs[0], expected))
    assert all(a.tobytes() == b.tobytes() for a, b in zip(*runs))
