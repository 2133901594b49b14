"""CUDA graphs on a real GPU (`pytest -m cuda`; skipped without one): graph steps are bitwise the
eager steps, for fp32 and bf16 (cuBLAS attention with dropout; flash attention without), and a
step costs Python N + 1 graph launches."""


import pytest

from crystal.config import resolve
from crystal.trainer import train

pytestmark = pytest.mark.cuda

MODEL = dict(n_layer=2, n_head=4, n_embd=64, block_size=64)


def run(precision: str, graphs: str, spheres: int, dropout: float, flash: bool = True):
    from crystal.backends.cuda import CudaBackend

    model_cfg, cfg = resolve("tiny", MODEL, dict(steps=4, spheres=spheres, micro_batches=6, batch_size=4,
                                                 seq_len=64, dropout=dropout, device="cuda", precision=precision,
                                                 cuda_graphs=graphs))
    return train(model_cfg, cfg, backend=CudaBackend(precision, graphs=True, flash=flash))


@pytest.mark.parametrize("precision, dropout, flash", [("fp32", 0.1, True), ("bf16", 0.1, False), ("bf16", 0.0, True)])
def test_graph_steps_on_the_gpu_are_bitwise_the_eager_steps(precision, dropout, flash):
    eager = run(precision, "off", 3, dropout, flash)
    for spheres in (1, 3):
        graphs = run(precision, "on", spheres, dropout, flash)
        assert graphs.root["cuda_graphs"] and graphs.root["graph_steps"] == 3
        assert graphs.root["graph_launches_per_step"] <= spheres + 2
        assert graphs.losses == eager.losses
        assert graphs.params.tobytes() == eager.params.tobytes()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_replayed_decode_steps_on_the_gpu_are_bitwise_the_eager_steps(precision):
    from crystal.backends.cuda import CudaBackend
    from crystal.config import ModelConfig
    from crystal.generate import Decoder
    from crystal.model import GPT, init_params

    cfg = ModelConfig(vocab_size=300, block_size=64, n_layer=2, n_head=4, n_embd=64)
    model = GPT(cfg, init_params(cfg, 0), CudaBackend(precision, graphs=True))
    prompts = [[5, 9, 2], [7], list(range(1, 20))]
    runs = []
    for graphs in (False, True):
        dec = Decoder(model, 3, graphs=graphs)
        out = [dec.prefill(prompts)]
        for k in range(6):  # rows 0..1 at steps 0 and 3, all three otherwise
            out.append(dec.decode([(7 * k + b) % 300 for b in range(3 if k % 3 else 2)]))
        runs.append((out, dec.graphs))
    (eager, _), (replayed, graphs) = runs
    assert graphs.failed is None and graphs.replays == 4  # 4 steps of 3 rows, 2 of 2: each prefix's first eager
    assert all(a.tobytes() == b.tobytes() for a, b in zip(replayed, eager))
