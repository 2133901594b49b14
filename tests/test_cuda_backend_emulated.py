"""The cuda backend's host code, run with numpy arrays and the CPU-emulated kernels.

On a GPU, crystal.backends.cuda launches kernels/*.cu through cupy; here the very same backend
class runs with numpy standing in for cupy (numpy's matmul for cuBLAS) and the kernels compiled
by g++ under tests/emu/emu.h. This checks what the kernel tests alone cannot: the argument
order, launch geometry, buffer layouts and the attention/encoder compositions of the backend,
against the cpu backend, for a whole model and for training steps. Both vocabularies here (259,
300) are padded in the LM head (to 320), as every vocabulary that is no multiple of 64 is.
"""

import dataclasses

import numpy as np
import pytest

from crystal.config import ModelConfig, resolve
from crystal.data import default_corpus, load_dataset, prepare
from crystal.model import GPT, ParamLayout, init_params
from crystal.trainer import train
from emu.backend import EmulatedCudaBackend
from compare import rel_err, worst_rel_err

CFG = ModelConfig(vocab_size=259, block_size=40, n_layer=2, n_head=3, n_embd=48)


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(5)
    flat = init_params(CFG, 3)
    flat += rng.standard_normal(flat.shape).astype(np.float32) * 0.02
    flat[slice(*ParamLayout(CFG).padding)] = 0  # the LM head's padding rows are zero
    idx = rng.integers(0, CFG.vocab_size, (3, 37))
    targets = rng.integers(0, CFG.vocab_size, (3, 37))
    return GPT(CFG, flat), GPT(CFG, flat, EmulatedCudaBackend()), idx, targets


def test_emulated_cuda_backend_loss_matches_cpu(pair):
    cpu, gpu, idx, targets = pair
    a, b = cpu.loss(idx, targets), gpu.loss(idx, targets)
    assert abs(a - b) / a <= 1e-5


def test_emulated_cuda_backend_logits_match_cpu(pair):
    cpu, gpu, idx, _ = pair
    assert rel_err(gpu.logits(idx), cpu.logits(idx)) <= 1e-5


def test_emulated_cuda_backend_gradients_match_cpu(pair):
    cpu, gpu, idx, targets = pair
    _, ga = cpu.loss_and_grads(idx, targets)
    _, gb = gpu.loss_and_grads(idx, targets)
    worst, err = worst_rel_err(gb, ga)
    assert err <= 1e-4, (worst, err)


def test_emulated_cuda_training_with_dropout_follows_the_cpu_trajectory_for_any_sphere_count(tmp_path):
    """On 300 BPE tokens: the LM head's rows padded to 320, which stay zero."""
    (tmp_path / "input.txt").write_bytes(default_corpus()[:50_000])
    prepare([str(tmp_path / "input.txt")], str(tmp_path / "data"), "bpe", vocab_size=300)
    data = load_dataset(str(tmp_path / "data"))
    small = dict(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=300)  # emulation is slow: keep it tiny
    model_cfg, cfg = resolve("tiny", small, dict(steps=2, spheres=3, micro_batches=3, batch_size=1,
                                                 dropout=0.2))
    cpu_run = train(model_cfg, cfg, dataset=data)
    backend = EmulatedCudaBackend()
    one = train(model_cfg, dataclasses.replace(cfg, spheres=1), dataset=data, backend=backend)
    three = train(model_cfg, cfg, dataset=data, backend=backend)
    assert max(abs(x - y) / x for x, y in zip(cpu_run.losses, three.losses)) <= 1e-4
    assert one.losses == three.losses and one.params.tobytes() == three.params.tobytes()
    assert not three.params[slice(*ParamLayout(model_cfg).padding)].any()


def test_matmul_precision_call_fits_the_installed_cupy_api(monkeypatch):
    """cupy's set_compute_type is Cython, without a signature: its docstring names the arguments."""
    linalg = pytest.importorskip("cupy._core._routines_linalg")
    from crystal.backends.cuda import set_matmul_precision

    n_params = len(linalg.set_compute_type.__doc__.split("(", 1)[1].split(")", 1)[0].split(","))
    calls = []
    monkeypatch.setattr(linalg, "set_compute_type", lambda *args: calls.append(args))
    set_matmul_precision("tf32")
    set_matmul_precision("fp32")
    assert [len(c) for c in calls] == [n_params, n_params]
    assert [c[-1] for c in calls] == [linalg.COMPUTE_TYPE_TF32, linalg.COMPUTE_TYPE_PEDANTIC]


def test_emulated_cuda_backend_masked_loss_and_gradients_match_cpu(pair):
    """Targets < 0 (prompt tokens of instruction data) are skipped by both backends alike."""
    cpu, gpu, idx, targets = pair
    masked = np.where(np.arange(targets.size).reshape(targets.shape) % 3 == 0, -1, targets)
    a, ga = cpu.loss_and_grads(idx, masked)
    b, gb = gpu.loss_and_grads(idx, masked)
    assert abs(a - b) / a <= 1e-5
    worst, err = worst_rel_err(gb, ga)
    assert err <= 1e-4, (worst, err)
