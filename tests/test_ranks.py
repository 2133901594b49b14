"""Ranks without MPI: discovery from launcher variables, the tree split, the cross-rank
reducer (ranks as threads), the watchdog, and a world of one importing no MPI."""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from crystal.backends.cpu import CpuBackend
from crystal.errors import CrystalError
from crystal.reducer import GradientReducer, split_tree, tree_pairs
from crystal.world import EXIT_RANK_FAILURE, World, discover, rank_ranges
from thread_ranks import ThreadComm, fake_cupy_modules


# --- discovery ---------------------------------------------------------------------------------

def test_no_launcher_variables_is_a_world_of_one():
    assert discover({}) == World(0, 1, 0, "single")


@pytest.mark.parametrize("env, expected", [
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1"},
     (1, 4, 1, "mpi")),
    ({"PMI_RANK": "2", "PMI_SIZE": "3", "MPI_LOCALRANKID": "0"}, (2, 3, 0, "mpi")),
    ({"PMIX_RANK": "0", "PMIX_SIZE": "2"}, (0, 2, 0, "mpi")),
    ({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1"}, (5, 8, 1, "slurm")),
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3"}, (3, 4, 3, "torchrun")),
])
def test_launcher_variables_give_rank_size_and_local_rank(env, expected):
    w = discover(env)
    assert (w.rank, w.size, w.local_rank, w.launcher) == expected


def test_torchrun_variables_carry_the_rendezvous_address():
    w = discover({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"})
    assert (w.master_addr, w.master_port) == ("10.0.0.1", 29500)


def test_mpi_variables_win_over_torchrun_ones():
    env = {"PMI_RANK": "1", "PMI_SIZE": "2", "RANK": "0", "WORLD_SIZE": "1"}
    assert discover(env).launcher == "mpi" and discover(env).rank == 1


def test_an_sbatch_script_without_srun_is_a_world_of_one():
    assert discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}).size == 1


@pytest.mark.parametrize("env", [
    {"RANK": "2", "WORLD_SIZE": "2"},
    {"RANK": "-1", "WORLD_SIZE": "2"},
    {"RANK": "x", "WORLD_SIZE": "2"},
    {"RANK": "0", "WORLD_SIZE": "0"},
    {"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "http"},
])
def test_nonsense_launcher_variables_are_a_clear_error(env):
    with pytest.raises(CrystalError):
        discover(env)


# --- the tree split ------------------------------------------------------------------------------

SHAPES = [(1, 1), (12, 1), (12, 2), (12, 3), (12, 4), (12, 5), (12, 12), (7, 3), (16, 4), (13, 2), (2, 2)]


@pytest.mark.parametrize("m, r", SHAPES)
def test_split_keeps_every_tree_addition_in_tree_order(m, r):
    s = split_tree(m, r)
    pairs = tree_pairs(m)
    assert sorted(sum(s.local, []) + s.top) == sorted(pairs)
    order = {p: i for i, p in enumerate(pairs)}
    for seq in s.local + [s.top]:
        assert [order[p] for p in seq] == sorted(order[p] for p in seq)


@pytest.mark.parametrize("m, r", [(8, 2), (16, 4), (12, 3), (12, 12)])
def test_ranks_send_one_root_each_when_their_ranges_are_whole_subtrees(m, r):
    assert [len(x) for x in split_tree(m, r).roots] == [1] * r


def test_twelve_micro_batches_on_two_ranks_send_two_roots_each():
    s = split_tree(12, 2)
    assert s.ranges == [range(0, 6), range(6, 12)]
    assert s.roots == [[0, 4], [6, 8]]


def test_rank_ranges_are_contiguous_and_balanced():
    ranges = rank_ranges(12, 5)
    assert [len(x) for x in ranges] == [2, 2, 3, 2, 3]
    assert [i for rg in ranges for i in rg] == list(range(12))


# --- the cross-rank reducer, ranks as threads -------------------------------------------------

def run_ranks(m: int, r: int, grads: np.ndarray, losses: list[float], make_comm=None):
    """Reduce per-micro-batch grads[m] and losses on r thread-ranks; each rank's (grad, norm, loss).
    make_comm(rank, shared) builds a rank's transport (default: ThreadComm)."""
    be = CpuBackend()
    shared = {"barrier": threading.Barrier(r)}
    make_comm = make_comm or (lambda i, shared: ThreadComm(i, r, shared))
    out = [None] * r

    def rank(i):
        red = GradientReducer(be, grads.shape[1], m, make_comm(i, shared))
        for j, mb in enumerate(red.owned):
            red.put(j, grads[mb])
        loss = red.reduce_losses([losses[mb] for mb in red.owned])
        norm = red.reduce()
        out[i] = (red.grad.copy(), norm, loss)

    threads = [threading.Thread(target=rank, args=(i,)) for i in range(r)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


@pytest.mark.parametrize("m, r", [s for s in SHAPES if s[1] > 1])
def test_reducer_across_ranks_is_bitwise_the_single_process_one(m, r):
    rng = np.random.default_rng(m * 100 + r)
    grads = rng.standard_normal((m, 5000)).astype(np.float32) * rng.uniform(0.1, 100, (m, 1)).astype(np.float32)
    losses = list(rng.uniform(1, 5, m))
    (g1, n1, l1), = run_ranks(m, 1, grads, losses)
    for g, n, l in run_ranks(m, r, grads, losses):
        assert np.array_equal(g.view(np.uint32), g1.view(np.uint32))
        assert n == n1 and l == l1


def test_fewer_micro_batches_than_ranks_is_a_clear_error():
    shared = {"barrier": threading.Barrier(1)}
    with pytest.raises(CrystalError, match="at least one micro-batch"):
        GradientReducer(CpuBackend(), 10, 2, ThreadComm(0, 3, shared))


# --- the watchdog and a world of one -----------------------------------------------------------

def test_a_collective_with_no_answer_ends_the_rank_with_a_clear_message():
    code = ("import time\n"
            "from crystal.world import Comm, World\n"
            "c = Comm(World(0, 2), timeout=0.5)\n"
            "c._collective('the gradient exchange', lambda: time.sleep(30))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    assert done.returncode == EXIT_RANK_FAILURE
    assert done.stderr.strip().splitlines() == [
        "error: rank 0: no answer from the other ranks for 0.5 s during the gradient exchange; "
        "a rank failed or hangs"]


def test_the_first_meeting_waits_longer_than_a_step():
    code = ("import time, numpy as np\n"
            "from crystal.world import Comm, World\n"
            "class Slow(Comm):\n"
            "    def _gather_values(self, v):\n"
            "        time.sleep(1.5)\n"
            "        return np.stack([v, v])\n"
            "Slow(World(0, 2), timeout=0.5).meet(123)\n"
            "print('met')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    assert done.returncode == 0 and done.stdout.strip() == "met", done.stderr


def test_a_world_of_one_imports_no_mpi(tmp_path):
    code = ("import sys\n"
            "from crystal.cli import main\n"
            f"rc = main(['train', '--preset', 'tiny', '--steps', '2', '--device', 'cpu', '--quiet', "
            f"'--out', {str(tmp_path / 'run')!r}])\n"
            "assert rc == 0, rc\n"
            "assert not [m for m in sys.modules if m.startswith(('mpi4py', 'cupyx.distributed'))]\n")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "OMPI_", "PMIX_", "SLURM_")) and k not in ("RANK", "WORLD_SIZE")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr


def test_comm_timeout_must_be_positive(tmp_path):
    from crystal.cli import main

    assert main(["train", "--preset", "tiny", "--steps", "2", "--device", "cpu", "--quiet",
                 "--comm-timeout", "0", "--out", str(tmp_path / "r")]) == 2


# --- the NCCL transport against cupyx.distributed's API, with a stand-in for the GPU -------------

def test_nccl_transport_reduces_bitwise_like_one_process(monkeypatch):
    from crystal.world import NcclComm

    m, r = 12, 2
    calls = []
    for name, mod in fake_cupy_modules(calls, r).items():
        monkeypatch.setitem(sys.modules, name, mod)
    rng = np.random.default_rng(7)
    grads, losses = rng.standard_normal((m, 3000)).astype(np.float32), list(rng.uniform(1, 5, m))
    (g1, n1, l1), = run_ranks(m, 1, grads, losses)
    out = run_ranks(m, r, grads, losses,
                    lambda i, _: NcclComm(World(i, r, i, "torchrun", "127.0.0.1", 29500), timeout=30))
    assert sorted(c["rank"] for c in calls) == [0, 1]
    assert all(c["host"] == "127.0.0.1" and c["port"] == 29500 and c["backend"] == "nccl" for c in calls)
    for g, n, loss in out:
        assert g.tobytes() == g1.tobytes() and n == n1 and loss == l1


def test_nccl_calls_fit_the_installed_cupyx_distributed_api():
    """The keyword names and argument counts crystal uses, bound to cupyx's real signatures."""
    import inspect

    dist = pytest.importorskip("cupyx.distributed")
    from cupyx.distributed._nccl_comm import NCCLBackend

    inspect.signature(dist.init_process_group).bind(2, 0, backend="nccl", use_mpi=False,
                                                    host="127.0.0.1", port=29500)
    inspect.signature(NCCLBackend.all_gather).bind(None, "in", "out", 10)


def test_torchrun_variables_on_the_cpu_without_mpiexec_are_a_one_line_error(tmp_path):
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2"}
    done = subprocess.run([sys.executable, "-m", "crystal.cli", "train", "--preset", "tiny", "--device", "cpu",
                           "--steps", "2", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "mpi" in lines[0].lower()


def test_memory_estimate_counts_a_ranks_pool_and_every_ranks_roots():
    from crystal.config import resolve
    from crystal.memory import memory_estimate

    model, cfg = resolve("tiny")
    one = memory_estimate(model, 12, 1, cfg.batch_size, cfg.seq_len)
    two = memory_estimate(model, 12, 1, cfg.batch_size, cfg.seq_len, ranks=2)
    assert one["grads"] == (1 + 4 + 1) * one["params"]  # a pool of 1 sphere + ceil(log2 12) + 1 rows
    assert two["grads"] == (1 + 3 + 1 + 2 * 2) * two["params"]  # 6 micro-batches: a pool of 5, + 2 roots of each rank
