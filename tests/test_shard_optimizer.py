"""The sharded optimizer (ZeRO-1) with ranks as threads: each rank finishes, clips and updates
its span of the chunks only, and every step is bitwise the single-process step."""

import sys
import threading

import numpy as np
import pytest

from crystal.backends.cpu import CpuBackend
from crystal.config import ModelConfig, TrainConfig, resolve
from crystal.memory import memory_estimate
from crystal.model import ParamLayout
from crystal.optim import AdamW, clip_scale
from crystal.reducer import CHUNKS, GradientReducer, chunk_bounds, shard_spans
from crystal.world import Comm, World
from thread_ranks import ThreadComm, fake_cupy_modules, run_ranks

MODEL = ModelConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=24)
SIZE = ParamLayout(MODEL).size
CFG = TrainConfig(lr=3e-3, grad_clip=1.0)


def bits(x) -> bytes:
    return np.ascontiguousarray(x).view(np.uint32).tobytes()


def train_steps(m: int, ranks: int, grads: list[np.ndarray], shard: bool, make_comm=None, init=None):
    """Steps of reducer + AdamW on `ranks` thread-ranks, grads[s][m] the micro-batch gradients of
    step s; per rank: (params, norms, m and v gathered on rank 0, its optimizer, its comm, the
    bytes it sent in the steps)."""
    be, layout = CpuBackend(), ParamLayout(MODEL)
    shared = {"barrier": threading.Barrier(ranks)}
    make_comm = make_comm or (lambda i: ThreadComm(i, ranks, shared) if ranks > 1 else Comm())
    start = np.random.default_rng(1).standard_normal(SIZE).astype(np.float32) * 0.02 if init is None else init

    def rank(i):
        comm = make_comm(i)
        red = GradientReducer(be, SIZE, m, comm, spheres=2, shard=shard)
        opt = AdamW(be, layout, CFG, red.chunks, span=red.span)
        params, norms = start.copy(), []
        for step, g in enumerate(grads):
            for j, mb in enumerate(red.owned):
                red.put(j, g[mb])
            norm = red.reduce()
            opt.begin_step(1e-3 * (step + 1), clip_scale(norm, CFG.grad_clip))
            for c in red.my_chunks:
                opt.update_chunk(c, params, red.grad)
            red.gather_params(params)
            norms.append(norm)
        sent = comm.bytes_sent
        moments = opt.gather_state(red)[:2]
        return params, norms, *moments, opt, comm, sent

    return run_ranks(ranks, rank, shared)


def random_steps(m: int, steps: int = 2, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((m, SIZE)) * rng.uniform(0.01, 3, (m, 1))).astype(np.float32) for _ in range(steps)]


@pytest.mark.parametrize("size, ranks", [(SIZE, 2), (SIZE, 3), (SIZE, 4), (1000, 5), (100, 48), (7, 4)])
def test_shard_spans_are_whole_chunks_that_cover_the_buffer_in_rank_order(size, ranks):
    spans, bounds = shard_spans(size, ranks), chunk_bounds(size)
    assert spans[0][0] == 0 and spans[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    starts = {s for s, _ in bounds} | {size}
    assert all(lo in starts and hi in starts for lo, hi in spans)


@pytest.mark.parametrize("m, ranks", [(12, 2), (12, 4), (12, 3), (5, 2), (8, 8)])
def test_sharded_steps_are_bitwise_the_single_process_steps(m, ranks):
    grads = random_steps(m)
    (p1, n1, m1, v1, *_), = train_steps(m, 1, grads, shard=False)
    out = train_steps(m, ranks, grads, shard=True)
    for params, norms, *_ in out:
        assert bits(params) == bits(p1) and norms == n1
    _, _, m_root, v_root, *_ = out[0]  # rank 0 holds the whole moments, as a checkpoint needs them
    assert bits(m_root) == bits(m1) and bits(v_root) == bits(v1)
    assert all(o[2] is None for o in out[1:])


def test_a_step_with_clipping_is_bitwise_too():
    grads = [g * 1e3 for g in random_steps(12, steps=1, seed=3)]
    (p1, n1, *_), = train_steps(12, 1, grads, shard=False)
    assert n1[0] > 100 * CFG.grad_clip  # the clipping factor is in play
    for params, norms, *_ in train_steps(12, 4, grads, shard=True):
        assert bits(params) == bits(p1) and norms == n1


def test_each_rank_keeps_moments_and_a_finished_gradient_of_its_span_only():
    out = train_steps(12, 4, random_steps(12, steps=1), shard=True)
    chunk = chunk_bounds(SIZE)[0][1]
    for i, (*_, opt, _, _) in enumerate(out):
        lo, hi = shard_spans(SIZE, 4)[i]
        assert opt.m.size == opt.v.size == hi - lo
        assert abs(opt.m.size - SIZE / 4) <= CHUNKS / 4 * 16 + chunk  # a quarter, within a chunk's rounding


def test_one_process_with_the_flag_owns_every_chunk_and_changes_nothing():
    red = GradientReducer(CpuBackend(), SIZE, 12, Comm(), shard=True)
    assert not red.sharded and red.span == (0, SIZE) and red.my_chunks == range(CHUNKS)
    grads = random_steps(12)
    (a, na, *_), = train_steps(12, 1, grads, shard=True)
    (b, nb, *_), = train_steps(12, 1, grads, shard=False)
    assert bits(a) == bits(b) and na == nb


def test_sharding_sends_fewer_bytes_than_replicating_at_four_ranks():
    grads = random_steps(16, steps=1)
    sharded = train_steps(16, 4, grads, shard=True)[1][6]
    replicated = train_steps(16, 4, grads, shard=False)[1][6]
    assert 0 < sharded < 0.6 * replicated  # one root per rank: 2 (R - 1) / R rows against R - 1


def test_nccl_sharded_exchange_is_bitwise_the_single_process_one(monkeypatch):
    from crystal.world import NcclComm

    calls = []
    for name, mod in fake_cupy_modules(calls, 3).items():
        monkeypatch.setitem(sys.modules, name, mod)
    grads = random_steps(12)
    (p1, n1, m1, v1, *_), = train_steps(12, 1, grads, shard=False)
    out = train_steps(12, 3, grads, shard=True,
                      make_comm=lambda i: NcclComm(World(i, 3, i, "torchrun", "127.0.0.1", 29500), timeout=30))
    for params, norms, *_ in out:
        assert bits(params) == bits(p1) and norms == n1
    assert bits(out[0][2]) == bits(m1) and bits(out[0][3]) == bits(v1)
    used = set(out[0][5].nccl.calls)
    assert {"all_to_all", "all_gather", "gather"} <= used


def test_nccl_calls_of_the_sharded_exchange_fit_the_installed_cupyx_api():
    import inspect

    pytest.importorskip("cupyx.distributed")
    from cupyx.distributed._nccl_comm import NCCLBackend

    inspect.signature(NCCLBackend.all_to_all).bind(None, "in", "out")
    inspect.signature(NCCLBackend.gather).bind(None, "in", "out", 0)
    inspect.signature(NCCLBackend.all_gather).bind(None, "in", "out", 10)


def test_memory_estimate_gives_a_quarter_of_the_moments_per_rank_at_four_ranks():
    model, cfg = resolve("small")
    n = ParamLayout(model).size
    one = memory_estimate(model, 12, 1, cfg.batch_size, cfg.seq_len)
    four = memory_estimate(model, 12, 1, cfg.batch_size, cfg.seq_len, ranks=4, shard=True)
    chunk_bytes = 2 * 4 * chunk_bounds(n)[0][1]
    assert abs(four["adamw_moments"] - one["adamw_moments"] / 4) <= chunk_bytes
    replicated = memory_estimate(model, 12, 1, cfg.batch_size, cfg.seq_len, ranks=4)
    assert four["grads"] < replicated["grads"] and four["total"] < replicated["total"]


def test_dry_run_prints_per_rank_memory_with_and_without_sharding():
    from crystal.cli import format_dry_run

    model, cfg = resolve("small")
    text = format_dry_run(model, cfg, ranks=4)
    assert "per rank (4 ranks, sharded optimizer)" in text
    assert "memory per rank without --shard-optimizer" in text
    off = format_dry_run(model, resolve("small", train_overrides=dict(shard_optimizer=False))[1], ranks=4)
    assert "replicated optimizer" in off and "memory per rank with --shard-optimizer" in off
    assert "per rank" not in format_dry_run(model, cfg, ranks=1)


@pytest.mark.parametrize("call, what", [
    ("c.alltoallv(x, [4, 4], [0, 4], x, [4, 4], [0, 4], 4)", "the gradient exchange"),
    ("c.allgatherv(x, [4, 4], [0, 4])", "the parameter all-gather"),
    ("c.gatherv(x[:4], [4, 4], [0, 4])", "the gather of the optimizer state"),
    ("c.gather([1.0], 48, 'the gradient norm')", "the gradient norm"),
])
def test_every_collective_of_the_sharded_exchange_is_under_the_watchdog(call, what):
    import subprocess

    from crystal.world import EXIT_RANK_FAILURE

    code = ("import time, numpy as np\n"
            "from crystal.world import Comm, World\n"
            "class Hung(Comm):\n"
            "    def _alltoallv(self, *a): time.sleep(30)\n"
            "    def _allgatherv(self, *a): time.sleep(30)\n"
            "    def _gatherv(self, *a): time.sleep(30)\n"
            "    def _gather_values(self, v): time.sleep(30)\n"
            "c = Hung(World(0, 2), timeout=0.5)\n"
            "x = np.zeros(8, np.float32)\n"
            f"{call}\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    assert done.returncode == EXIT_RANK_FAILURE
    assert done.stderr.strip().splitlines() == [
        f"error: rank 0: no answer from the other ranks for 0.5 s during {what}; a rank failed or hangs"]


# --- the cuda backend's side (emulated kernels: tests/emu) --------------------------------------

def test_sharded_steps_on_the_emulated_cuda_backend_are_bitwise_its_single_process_steps(monkeypatch):
    from emu.backend import EmulatedCudaBackend

    monkeypatch.setattr(sys.modules[__name__], "CpuBackend", EmulatedCudaBackend)
    grads = random_steps(4, steps=1)
    (p1, n1, m1, *_), = train_steps(4, 1, grads, shard=False)
    out = train_steps(4, 2, grads, shard=True)
    for params, norms, *_ in out:
        assert bits(params) == bits(p1) and norms == n1
    assert bits(out[0][2]) == bits(m1)


def test_the_bf16_weight_copy_is_refreshed_in_place_after_the_parameter_all_gather():
    from emu.backend import EmulatedCudaBackend
    from lt_standin import LtStandIn

    be = EmulatedCudaBackend("bf16", lt=LtStandIn(), flash=False)
    flat = be.to_device(np.random.default_rng(0).standard_normal(1000).astype(np.float32))
    copy = be.compute_weights(flat)
    flat[...] = flat * 3  # as if other ranks' spans had arrived
    assert be.compute_weights(flat, out=copy) is copy
    assert np.array_equal(np.asarray(copy).view(np.uint16), np.asarray(be.compute_weights(flat)).view(np.uint16))
