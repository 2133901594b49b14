"""The cuda backend's whole llama under emulation (tests/emu): the model's host code, launch
geometry and buffer layouts with the emulated kernels, against the cpu backend.

The models are tests/test_llama_model.py's tiny random transformers ones (2 layers, 4 heads on 2
KV heads, 64 wide, SwiGLU 176, vocab 300 padded to 320): tied, untied with llama3 rope scaling
(theta 500000), and Qwen2 (q/k/v biases). fp32: the logits and every parameter's gradient equal
the cpu backend's (which equals torch autograd's, test_llama_model.py) within the fp32 tolerance
of tests/test_cuda_backend_emulated.py; bf16 (cuBLASLt and cuDNN stand-ins, both attention
paths): every gradient with cosine >= 0.99. Training: bf16 steps through cuBLASLt and the cuDNN
GQA stand-in follow the fp32 cpu trajectory, and steps replayed as CUDA graphs are bitwise the
eager ones.
"""

import dataclasses

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from crystal.config import resolve  # noqa: E402
from crystal.model import GPT  # noqa: E402
from crystal.trainer import train  # noqa: E402
from compare import rel_err, worst_rel_err  # noqa: E402
from cudnn_standin import CudnnStandIn  # noqa: E402
from emu.backend import EmulatedCudaBackend  # noqa: E402
from lt_standin import LtStandIn  # noqa: E402
from test_llama_model import batch, crystal_config, crystal_flat, hf_model  # noqa: E402

EMULATED = ("tied", "llama3", "qwen2")  # tied; untied with llama3 rope scaling; q/k/v biases


def cosine(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


@pytest.fixture(scope="module")
def reference():
    """name -> (config, flat parameters, the cpu backend's logits, loss and gradients) of a
    variant, each computed once."""
    done = {}

    def of(name: str):
        if name not in done:
            cfg = crystal_config(name)
            flat = crystal_flat(hf_model(name), cfg)
            cpu = GPT(cfg, flat)
            idx, tgt = batch(1)
            done[name] = cfg, flat, cpu.logits(idx), cpu.loss_and_grads(idx, tgt)
        return done[name]
    return of


@pytest.mark.parametrize("name", EMULATED)
def test_emulated_fp32_logits_and_every_gradient_equal_the_cpu_backends(reference, name):
    cfg, flat, logits, (loss, grads) = reference(name)
    gpu = GPT(cfg, flat, EmulatedCudaBackend())
    idx, tgt = batch(1)
    assert rel_err(gpu.logits(idx), logits) <= 1e-5
    got_loss, got = gpu.loss_and_grads(idx, tgt)
    assert abs(got_loss - loss) / loss <= 1e-5
    assert got.keys() == grads.keys()
    worst, err = worst_rel_err(got, grads)
    assert err <= 1e-4, (worst, err)


# each variant on one attention path: both paths, with and without q/k/v biases, tied and untied
@pytest.mark.parametrize("name, attention", [("tied", "cublas"), ("llama3", "flash"), ("qwen2", "flash")])
def test_emulated_bf16_gradients_have_cosine_at_least_0_99_with_the_cpu_backends(reference, name, attention):
    cfg, flat, _, (loss, grads) = reference(name)
    gpu = GPT(cfg, flat, EmulatedCudaBackend("bf16", lt=LtStandIn(), cudnn=CudnnStandIn() if attention == "flash"
                                             else None))
    idx, tgt = batch(1)
    got_loss, got = gpu.loss_and_grads(idx, tgt)
    assert abs(got_loss - loss) / loss <= 1e-2
    worst = min(grads, key=lambda k: cosine(got[k], grads[k]))
    assert cosine(got[worst], grads[worst]) >= 0.99, (worst, cosine(got[worst], grads[worst]))
    acts = gpu._activations(*idx.shape)  # attention's saved state: per query head, not per KV head
    assert acts.att[0].shape == ((2, 4, 16) if attention == "flash" else (2, 4, 16, 16))


TINY = dict(arch="llama", n_layer=1, n_head=4, n_kv_head=2, n_embd=16, block_size=8, intermediate_size=24,
            tie_word_embeddings=False, attention_bias=True)  # emulation is slow: keep it tiny


def test_bf16_training_through_cublaslt_and_cudnn_follows_cpu_and_graph_steps_are_bitwise_eager():
    def run(graphs: str):
        model_cfg, cfg = resolve("tiny", TINY, dict(steps=2, spheres=2, micro_batches=2, batch_size=1,
                                                    dropout=0.1, cuda_graphs=graphs))
        be = EmulatedCudaBackend("bf16", lt=LtStandIn(), cudnn=CudnnStandIn(), graphs=True)
        return model_cfg, cfg, train(model_cfg, cfg, backend=be)

    model_cfg, cfg, eager = run("off")
    _, _, replayed = run("on")
    assert replayed.root["cuda_graphs"] and replayed.root["graph_steps"] == 1  # the first step is eager
    assert replayed.losses == eager.losses and replayed.params.tobytes() == eager.params.tobytes()
    cpu = train(model_cfg, dataclasses.replace(cfg, cuda_graphs="off"))
    assert max(abs(x - y) / y for x, y in zip(eager.losses, cpu.losses)) <= 2e-2
    assert rel_err(eager.params, cpu.params) <= 2e-2
