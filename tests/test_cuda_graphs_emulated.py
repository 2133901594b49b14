"""CUDA graphs (crystal.graphs), played under emulation: a capture records every launch and
library call of the cuda backend's host code, a replay runs the record (tests/emu/backend.py).

What holds here holds for the graphs a GPU captures from the same host code: replayed steps are
bitwise the eager steps (any sphere count, dropout on, across a resume), nothing inside a
capture allocates, reads back or synchronizes, and a step costs Python N + 1 graph launches.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from crystal.config import resolve
from crystal.errors import CrystalError, GraphCaptureError
from crystal.graphs import graph_plan
from crystal.reducer import tree_pairs
from crystal.trainer import train
from emu.backend import EmulatedCudaBackend

SMALL = dict(n_layer=1, n_head=2, n_embd=16, block_size=8)  # emulation is slow: keep it tiny


def configs(spheres: int, graphs: str, **over):
    train_over = dict(steps=3, spheres=spheres, micro_batches=3, batch_size=1, dropout=0.2, cuda_graphs=graphs)
    return resolve("tiny", SMALL, {**train_over, **over})


@pytest.fixture(scope="module")
def eager():
    return train(*configs(3, "off"), backend=EmulatedCudaBackend(graphs=True))


@pytest.fixture(scope="module", params=[1, 3])
def replayed(request):
    be = EmulatedCudaBackend(graphs=True)
    return request.param, train(*configs(request.param, "on"), backend=be), be


# --- the static schedule -------------------------------------------------------------------------

def symbolic_tree(n: int):
    """The fixed tree's sum over leaves 0..n-1 as a nested tuple (its order of additions)."""
    nodes = list(range(n))
    for d, s in tree_pairs(n):
        nodes[d] = (nodes[d], nodes[s])
    return nodes[0]


@pytest.mark.parametrize("n, spheres", [(n, s) for n in range(1, 14) for s in (1, 2, 3, 5, 12)])
def test_graph_plan_sums_the_micro_batches_in_the_fixed_trees_order(n, spheres):
    plan = graph_plan(n, spheres)
    rows: dict[int, object] = {}
    for j in range(n):  # each sphere's leaves and additions, block by block (blocks touch their own rows)
        rows[plan.row[j]] = j
        for d, s in plan.adds[j]:
            rows[d] = (rows[d], rows.pop(s))
    for d, s in plan.final.tolist():
        rows[d] = (rows[d], rows.pop(s))
    assert rows == {0: symbolic_tree(n)}


@pytest.mark.parametrize("n, spheres", [(12, 12), (12, 5), (32, 4), (7, 3), (3, 8)])
def test_graph_plan_gives_each_sphere_contiguous_micro_batches_and_rows_of_its_own(n, spheres):
    plan = graph_plan(n, spheres)
    assert list(itertools.chain(*plan.blocks)) == list(range(n))
    owned = [{plan.row[j] for j in block} | {r for j in block for pair in plan.adds[j] for r in pair}
             for block in plan.blocks]
    assert all(not (a & b) for a, b in itertools.combinations(owned, 2))
    assert plan.row[0] == 0 and plan.rows <= n


# --- replayed steps ------------------------------------------------------------------------------

def test_replayed_steps_are_bitwise_the_eager_steps_with_dropout(eager, replayed):
    spheres, run, _ = replayed
    assert run.root["cuda_graphs"] and run.root["graph_steps"] == 2  # the first step is eager
    assert run.losses == eager.losses
    assert run.params.tobytes() == eager.params.tobytes()
    assert run.root["grad_norm"] == eager.root["grad_norm"]


def test_python_issues_at_most_n_plus_2_graph_launches_a_step(replayed):
    spheres, run, be = replayed
    assert run.root["graph_launches_per_step"] <= spheres + 2
    assert be.captures == min(spheres, 3) + 1  # each graph captured once, then replayed


def test_every_sphere_reports_its_micro_batches_and_losses_under_graphs(replayed):
    spheres, run, _ = replayed
    assert sum(s["batches"] for s in run.spheres) == 3 * 3
    assert all(np.isfinite(s["avg_loss"]) for s in run.spheres if s["batches"])


def test_resumed_graph_run_is_bitwise_the_straight_run(eager, tmp_path):
    from crystal.checkpoint import RunDir

    model_cfg, cfg = configs(2, "on", checkpoint_every=1)
    stopped = train(model_cfg, dataclasses.replace(cfg, stop_at=1), RunDir(tmp_path / "r"),
                    backend=EmulatedCudaBackend(graphs=True))
    assert not stopped.finished
    run = RunDir(tmp_path / "r", resume=True)
    resumed = train(model_cfg, cfg, run, resume=run.load_state(model_cfg), backend=EmulatedCudaBackend(graphs=True))
    assert resumed.root["graph_steps"] == 1
    assert resumed.losses == eager.losses[1:]
    assert resumed.params.tobytes() == eager.params.tobytes()


def test_a_graph_step_with_a_non_finite_loss_is_skipped_on_the_device():
    from crystal.model import init_params

    model_cfg, cfg = configs(2, "on", steps=2, on_nonfinite="skip")
    init = init_params(model_cfg, 0)
    init[5] = np.nan  # a token embedding: every loss that reads it is NaN
    run = train(model_cfg, cfg, backend=EmulatedCudaBackend(graphs=True), init=init.copy())
    assert run.skipped == 2
    assert np.array_equal(run.params, init, equal_nan=True)  # neither step's update was applied


# --- capture failures ------------------------------------------------------------------------------

class FailingCapture(EmulatedCudaBackend):
    def end_capture(self):
        super().end_capture()
        raise GraphCaptureError("injected")


def test_a_bf16_step_with_cudnn_attention_and_cublaslt_is_captured_and_replays_the_eager_bits():
    from cudnn_standin import CudnnStandIn
    from lt_standin import LtStandIn

    def run(graphs):  # cuDNN's dropout reads a host seed: graphs need --dropout 0 with it
        be = EmulatedCudaBackend("bf16", lt=LtStandIn(), cudnn=CudnnStandIn(), graphs=True)
        return train(*configs(2, graphs, dropout=0.0, precision="bf16", steps=2), backend=be), be

    (eager, _), (replayed, be) = run("off"), run("on")
    assert be.flash and replayed.root["graph_steps"] == 1 and be.device.legacy_waits == 0
    assert replayed.losses == eager.losses and replayed.params.tobytes() == eager.params.tobytes()


def test_a_failed_capture_under_auto_warns_once_and_trains_on_eagerly(eager):
    warnings = []
    run = train(*configs(3, "auto"), backend=FailingCapture(graphs=True), on_warning=warnings.append)
    assert len(warnings) == 1 and "injected" in warnings[0]
    assert not run.root["cuda_graphs"]
    assert run.losses == eager.losses and run.params.tobytes() == eager.params.tobytes()


def test_a_failed_capture_under_on_is_a_one_line_error():
    model_cfg, cfg = configs(2, "on", steps=2)
    with pytest.raises(CrystalError, match="--cuda-graphs on: the capture failed .*injected"):
        train(model_cfg, cfg, backend=FailingCapture(graphs=True))


def test_cuda_graphs_on_needs_a_backend_made_for_graphs():
    with pytest.raises(CrystalError, match="--cuda-graphs on needs"):
        train(*configs(1, "on", steps=1), backend=EmulatedCudaBackend())


@pytest.mark.parametrize("mode, backend, ranks, wanted", [
    ("auto", "cpu", 1, False), ("auto", "graphs", 1, True), ("auto", "graphs", 2, False),
    ("off", "graphs", 1, False), ("on", "graphs", 1, True)])
def test_cuda_graphs_auto_captures_only_where_graphs_can_run(mode, backend, ranks, wanted):
    from crystal.backends.cpu import CpuBackend
    from crystal.trainer import _graphs_wanted

    be = CpuBackend() if backend == "cpu" else EmulatedCudaBackend(graphs=True)
    comm = type("Comm", (), {"size": ranks})()
    assert _graphs_wanted(configs(1, mode)[1], be, comm) is wanted


def test_cuda_graphs_on_across_ranks_is_a_one_line_error():
    from crystal.trainer import _graphs_wanted

    with pytest.raises(CrystalError, match="a single process"):
        _graphs_wanted(configs(1, "on")[1], EmulatedCudaBackend(graphs=True), type("Comm", (), {"size": 2})())


# --- what a capture refuses (the instrumented array module) ---------------------------------------

@pytest.fixture
def be():
    b = EmulatedCudaBackend(graphs=True)
    with b.sphere_context(0):  # a capture needs a stream of its own, as crystal.graphs gives it
        yield b
        if b.capturing():
            b.end_capture()


def test_capture_refuses_the_legacy_default_stream():
    b = EmulatedCudaBackend(graphs=True)  # outside sphere_context: cupy's null stream
    with pytest.raises(GraphCaptureError, match="legacy default stream cannot be captured"):
        b.begin_capture()


def test_capture_records_the_work_and_a_launch_replays_it(be):
    x = be.to_device(np.ones(5, np.float32))
    be.begin_capture()
    be.scale_inplace(x, 2.0)
    graph = be.end_capture()
    assert x.tolist() == [1.0] * 5  # recorded, not run
    be.launch_graph(graph)
    be.launch_graph(graph)
    assert x.tolist() == [4.0] * 5


@pytest.mark.parametrize("what", ["empty", "zeros", "to_device"])
def test_capture_refuses_an_allocation(be, what):
    be.begin_capture()
    with pytest.raises(GraphCaptureError, match="inside a CUDA graph capture"):
        be.to_device(np.ones(3)) if what == "to_device" else getattr(be, what)((3,))


@pytest.mark.parametrize("what", ["to_host", "synchronize", "sum_squares"])
def test_capture_refuses_a_read_back_or_a_synchronization(be, what):
    x = be.zeros((4,))
    be.begin_capture()
    with pytest.raises(GraphCaptureError, match="inside a CUDA graph capture"):
        {"to_host": lambda: be.to_host(x), "synchronize": be.synchronize,
         "sum_squares": lambda: be.sum_squares(x)}[what]()


def test_capture_refuses_cupys_own_cublas_product():
    b = EmulatedCudaBackend()  # fp32 without graphs: products through cupy.matmul, which a capture cannot hold
    out, x, w = b.zeros((2, 3)), b.zeros((2, 4)), b.zeros((4, 3))
    with b.sphere_context(0):
        b.begin_capture()
        with pytest.raises(GraphCaptureError, match="cupy's matmul inside a CUDA graph capture"):
            b.matmul_forward(out, x, w, None)
        b.end_capture()


def test_capture_refuses_an_array_made_inside_it_by_an_array_method(be):
    x = be.zeros((4,))
    be.begin_capture()
    be.scale_inplace(x.copy(), 2.0)  # x.copy() allocates, unseen by the array module
    with pytest.raises(GraphCaptureError, match="an array made inside"):
        be.end_capture()


def test_capture_refuses_a_dropout_key_that_was_not_staged(be):
    x = be.zeros((8,))
    be.begin_capture()
    with pytest.raises(GraphCaptureError, match="dropout key that was not staged"):
        be.dropout(x, x, 12345, 1 << 30, 1.5)


def test_staged_dropout_keys_are_read_from_device_memory_at_replay(be):
    from crystal.dropout import keep_mask

    out, inp = be.zeros((64,)), be.to_device(np.ones(64, np.float32))
    be.stage([(np.zeros((1, 4), np.int32),) * 2], 7, keys=[[111]])
    be.begin_capture()
    be.dropout(out, inp, 111, 1 << 31, 2.0)
    graph = be.end_capture()
    be.stage([(np.zeros((1, 4), np.int32),) * 2], 7, keys=[[222]])  # the next step's key, same slot
    be.launch_graph(graph)
    assert np.array_equal(out != 0, keep_mask(222, 1 << 31, 64))


def test_dry_run_counts_the_graphs_and_their_gradient_rows():
    from crystal.cli import format_dry_run

    model_cfg, cfg = resolve("gpt2", train_overrides={"cuda_graphs": "on", "device": "cuda"})
    text = format_dry_run(model_cfg, cfg)
    rows = graph_plan(cfg.micro_batches, cfg.spheres).rows
    assert f"cuda graphs: {cfg.spheres} sphere graphs + the root's; gradient rows {rows}" in text
