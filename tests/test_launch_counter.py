"""The cuda backend counts what Python issues (kernel launches, library calls, cupy array ops),
under emulation as on a GPU; `crystal train --device cuda` reports it per micro-batch and step.

Per layer and micro-batch (forward + backward), by the ops of crystal/model.py:
- fp32: 16 + 31 = 47 (products through cupy with separate bias kernels, attention as permute,
  product, softmax, product, unpermute and its backward as 8; each residual addition fused with
  the layernorm after it; each parameter-gradient column sum, layernorm's dw, db and a bias
  gradient, is two kernels: partial sums, then their fixed-order sum);
- bf16 with cuBLAS attention: 11 + 23 = 34 (bias and GELU in the products' epilogues, the bias
  gradient in the weight-gradient product);
- bf16 with cuDNN flash attention: 7 + 16 = 23 (attention is one graph each way).
"""

import numpy as np
import pytest

from crystal.config import ModelConfig, resolve
from crystal.model import GPT, init_params
from crystal.trainer import train
from cudnn_standin import CudnnStandIn
from emu.backend import EmulatedCudaBackend
from lt_standin import LtStandIn

BACKENDS = {
    "fp32": lambda: EmulatedCudaBackend(),
    "bf16-cublas": lambda: EmulatedCudaBackend("bf16", lt=LtStandIn()),
    "bf16-flash": lambda: EmulatedCudaBackend("bf16", lt=LtStandIn(), cudnn=CudnnStandIn()),
}
PER_LAYER = {"fp32": 47, "bf16-cublas": 34, "bf16-flash": 23}


def micro_batch_launches(kind: str, n_layer: int) -> int:
    cfg = ModelConfig(vocab_size=64, block_size=8, n_layer=n_layer, n_head=2, n_embd=16)
    model = GPT(cfg, init_params(cfg, 0), BACKENDS[kind]())
    idx = np.arange(16).reshape(2, 8) % 64
    before = model.backend.thread_launches()
    model.loss_and_grads(idx, idx)
    return model.backend.thread_launches() - before


@pytest.mark.parametrize("kind", list(PER_LAYER))
def test_launches_per_layer_match_the_ops_of_the_model(kind):
    assert micro_batch_launches(kind, 2) - micro_batch_launches(kind, 1) == PER_LAYER[kind]


def test_training_reports_launches_per_micro_batch_and_per_step():
    model_cfg, cfg = resolve("tiny", dict(n_layer=1, n_head=2, n_embd=16, block_size=8),
                             dict(steps=1, spheres=2, micro_batches=2, batch_size=1))
    root = train(model_cfg, cfg, backend=EmulatedCudaBackend()).root
    assert root["launches_per_micro_batch"] == micro_batch_launches("fp32", 1)
    assert root["launches_per_step"] > 2 * root["launches_per_micro_batch"]  # + reducer and optimizer


def test_the_cpu_backend_reports_no_launches():
    model_cfg, cfg = resolve("tiny", train_overrides=dict(steps=1, spheres=1, device="cpu"))
    assert "launches_per_step" not in train(model_cfg, cfg).root
