"""--precision bf16 without a GPU: the cuda backend's bf16 host code on numpy arrays, with the
emulated `_bf16` kernels and numpy stand-ins of cuBLASLt (tests/lt_standin.py) and cuDNN
(tests/cudnn_standin.py) that execute the library calls' semantics on host memory and round
to bf16 where the libraries do.

The bf16 model is compared with a float64 PyTorch reference: the loss within 1e-2 relative,
every parameter's gradient with cosine similarity >= 0.99, for both attention paths (cuDNN
flash attention, and cuBLAS + softmax in bf16). Training keeps fp32 master state: the sphere
count and a resume never change the bits (with dropout), and the flash path's steps follow the
fp32 cpu backend's.
"""

import dataclasses

import numpy as np
import pytest

from crystal.config import ModelConfig, resolve
from crystal.model import GPT, ParamLayout, init_params
from crystal.trainer import train
from compare import rel_err
from cudnn_standin import CudnnStandIn
from emu.backend import EmulatedCudaBackend
from lt_standin import LtStandIn
from torch_gpt2 import torch_loss_and_grads

CFG = ModelConfig(vocab_size=131, block_size=24, n_layer=2, n_head=3, n_embd=48)
ATTENTION = ["flash", "cublas"]


def bf16_backend(attention: str) -> EmulatedCudaBackend:
    return EmulatedCudaBackend("bf16", lt=LtStandIn(), cudnn=CudnnStandIn() if attention == "flash" else None)


def cosine(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(7)
    flat = init_params(CFG, 3)
    flat += rng.standard_normal(flat.shape).astype(np.float32) * 0.02
    flat[slice(*ParamLayout(CFG).padding)] = 0  # the LM head's padding rows are zero
    idx = rng.integers(0, CFG.vocab_size, (2, 21))
    targets = rng.integers(0, CFG.vocab_size, (2, 21))
    loss64, grads64, _ = torch_loss_and_grads(ParamLayout(CFG).views(flat), CFG, idx, targets)
    return flat, idx, targets, loss64, grads64


@pytest.fixture(scope="module", params=ATTENTION)
def bf16_model(request, batch):
    flat, idx, targets, _, _ = batch
    model = GPT(CFG, flat, bf16_backend(request.param))
    return request.param, model, model.loss_and_grads(idx, targets)


def test_bf16_backend_keeps_activations_in_bf16_and_attention_state_by_path(bf16_model):
    attention, model, _ = bf16_model
    acts = model._activations(2, 21)
    assert acts.qkv[0].dtype.itemsize == 2 and acts.logits.dtype.itemsize == 2
    assert acts.ln1_mean[0].dtype == np.float32 and acts.losses.dtype == np.float32
    hs = CFG.head_size
    assert acts.att[0].shape == ((2, 3, 21) if attention == "flash" else (2, 3, 21, 21))
    assert model.backend.attention_saved(2, 3, 21, hs)[0] == acts.att[0].shape


def test_bf16_loss_is_within_1e_2_of_the_float64_reference(bf16_model, batch):
    _, _, (loss, _) = bf16_model
    loss64 = batch[3]
    assert abs(loss - loss64) / loss64 <= 1e-2


def test_bf16_gradients_have_cosine_similarity_at_least_0_99_with_float64(bf16_model, batch):
    _, _, (_, grads) = bf16_model
    grads64 = batch[4]
    worst = min(grads64, key=lambda k: cosine(grads[k], grads64[k]))
    assert cosine(grads[worst], grads64[worst]) >= 0.99, (worst, cosine(grads[worst], grads64[worst]))


def test_bf16_gradients_are_float32_written_into_the_gradient_buffer(bf16_model):
    _, _, (_, grads) = bf16_model
    assert all(g.dtype == np.float32 and np.isfinite(g).all() for g in grads.values())


def test_bf16_weight_copy_is_the_rounded_parameters(bf16_model):
    import ml_dtypes

    _, model, _ = bf16_model
    copy = model._tensors.flat
    assert copy.dtype == ml_dtypes.bfloat16
    assert copy.tobytes() == model.flat.astype(ml_dtypes.bfloat16).tobytes()


SMALL = dict(n_layer=1, n_head=2, n_embd=16, block_size=8)  # emulation is slow: keep it tiny
# Each emulated step costs seconds whatever the model's size (the reducer's 48 chunks, each a
# 256-block norm launch), so the training tests share their runs: one dropout configuration,
# trained once per attention path on 1 sphere and on 3.
DROPOUT_RUN = dict(steps=2, spheres=3, micro_batches=3, batch_size=1, dropout=0.2, checkpoint_every=1)


@pytest.fixture(scope="module")
def dropout_runs():
    """attention -> (model config, train config, the 3-sphere run's backend, the run on 1 sphere,
    the run on 3), each trained once."""
    done = {}

    def of(attention: str):
        if attention not in done:
            model_cfg, cfg = resolve("tiny", SMALL, DROPOUT_RUN)
            one = train(model_cfg, dataclasses.replace(cfg, spheres=1), backend=bf16_backend(attention))
            be = bf16_backend(attention)
            done[attention] = model_cfg, cfg, be, one, train(model_cfg, cfg, backend=be)
        return done[attention]
    return of


@pytest.mark.parametrize("attention", ATTENTION)
def test_bf16_training_is_bitwise_the_same_for_any_sphere_count_with_dropout(dropout_runs, attention):
    *_, one, three = dropout_runs(attention)  # 1 sphere vs 3
    assert one.losses == three.losses and one.params.tobytes() == three.params.tobytes()


def test_bf16_training_follows_the_fp32_cpu_trajectory(dropout_runs):
    # the same dropout masks on both backends (crystal.dropout's hash); two steps: the losses of
    # the first two parameter sets and the parameters after two updates, all within 2e-2
    model_cfg, cfg, _, bf16, _ = dropout_runs("flash")
    cpu = train(model_cfg, dataclasses.replace(cfg, spheres=1))
    assert max(abs(x - y) / y for x, y in zip(bf16.losses, cpu.losses)) <= 2e-2
    assert rel_err(bf16.params, cpu.params) <= 2e-2


def test_bf16_run_resumed_from_a_checkpoint_is_bitwise_the_straight_run(dropout_runs, tmp_path):
    from crystal.checkpoint import RunDir

    model_cfg, cfg, be, _, straight = dropout_runs("flash")  # 3 spheres, dropout
    stopped = train(model_cfg, dataclasses.replace(cfg, stop_at=1), RunDir(tmp_path / "b"), backend=be)
    assert not stopped.finished
    run = RunDir(tmp_path / "b", resume=True)
    resumed = train(model_cfg, cfg, run, resume=run.load_state(model_cfg), backend=bf16_backend("flash"))
    assert straight.losses[1:] == resumed.losses
    assert straight.params.tobytes() == resumed.params.tobytes()


class _Device:
    def __init__(self, cc: str):
        self.compute_capability = cc


def test_bf16_on_a_gpu_below_compute_capability_8_is_a_one_line_error():
    from crystal.backends.cuda import _lt_libraries
    from crystal.errors import CrystalError

    with pytest.raises(CrystalError, match=r"compute capability 8\.0 or newer; this one is 7\.5") as e:
        _lt_libraries(_Device("75"), True)
    assert "\n" not in str(e.value)


def test_bf16_without_nvmath_is_a_one_line_error(monkeypatch):
    import sys

    from crystal.backends.cuda import _lt_libraries
    from crystal.errors import CrystalError

    monkeypatch.setitem(sys.modules, "nvmath.bindings", None)  # as if not installed
    with pytest.raises(CrystalError, match="needs nvmath-python") as e:
        _lt_libraries(_Device("90"), True)
    assert "\n" not in str(e.value)


def test_bf16_with_nvmath_on_an_sm90_gpu_finds_cublaslt_and_cudnn_where_it_runs(monkeypatch):
    import crystal.backends.cudnn_attention as cudnn_attention
    from crystal.backends.cuda import _lt_libraries
    from nvmath.bindings import cublasLt

    cudnn = pytest.importorskip("cudnn")  # the frontend (without libcudnn, unavailable_reason says so)
    monkeypatch.setattr(cudnn_attention, "unavailable_reason", lambda: None)  # as where libcudnn loads
    assert _lt_libraries(_Device("90"), True) == (cublasLt, cudnn)
    monkeypatch.setenv("CRYSTAL_CUDNN", "0")
    assert _lt_libraries(_Device("90"), True) == (cublasLt, None)


def test_bf16_where_cudnn_cannot_run_takes_the_cublas_attention_path(monkeypatch):
    import crystal.backends.cudnn_attention as cudnn_attention
    from crystal.backends.cuda import _lt_libraries
    from nvmath.bindings import cublasLt

    monkeypatch.setattr(cudnn_attention, "unavailable_reason", lambda: "the cuDNN library (libcudnn) is not loadable")
    assert _lt_libraries(_Device("90"), True) == (cublasLt, None)


def test_memory_estimate_of_bf16_flash_attention_drops_the_t_squared_activations():
    from crystal.memory import memory_estimate
    from crystal.model import activation_bytes

    cfg = ModelConfig(vocab_size=256, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    fp32 = activation_bytes(cfg, 4, 1024)
    cublas = activation_bytes(cfg, 4, 1024, "bf16")
    flash = activation_bytes(cfg, 4, 1024, "bf16", flash=True)
    t2 = 4 * 12 * 1024 * 1024  # one layer's [B,NH,T,T]
    assert flash < cublas < fp32
    assert cublas - flash == 2 * t2 * (12 + 1) - 4 * 4 * 12 * 1024 * 12  # bf16 probs per layer + scores grad, less the stats
    est = memory_estimate(cfg, 8, 2, 4, 1024, precision="bf16", flash=True)
    assert est["weights_bf16"] * 2 == est["params"]


def test_adamw_refreshes_the_bf16_weight_copy_in_the_same_pass():
    import ml_dtypes

    from crystal.model import ParamLayout
    from crystal.optim import AdamW

    be = bf16_backend("cublas")
    layout = ParamLayout(CFG)
    params = be.to_device(init_params(CFG, 1))
    copy = be.compute_weights(params)
    grads = np.random.default_rng(0).standard_normal(layout.size).astype(np.float32)
    _, cfg = resolve("tiny")
    opt = AdamW(be, layout, cfg, [(0, layout.size // 2), (layout.size // 2, layout.size)])
    opt.begin_step(1e-2)
    for c in range(2):
        opt.update_chunk(c, params, grads, copy)
    assert copy.tobytes() == params.astype(ml_dtypes.bfloat16).tobytes()
    assert copy.tobytes() != init_params(CFG, 1).astype(ml_dtypes.bfloat16).tobytes()


def test_flash_false_takes_the_cublas_attention_path_even_with_cudnn():
    be = EmulatedCudaBackend("bf16", lt=LtStandIn(), cudnn=CudnnStandIn(), flash=False)
    assert not be.flash and be.attention_saved(2, 3, 21, 16) == ((2, 3, 21, 21), be.act_dtype)
