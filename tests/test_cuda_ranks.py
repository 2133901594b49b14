"""Several ranks on GPUs (`pytest -m cuda`): NCCL through cupyx.distributed when each rank has
its own GPU (mpiexec, or torchrun-style variables), MPI through host memory when ranks share
one. Each must give bitwise the single-process cuda run, with the sharded optimizer (the
default with ranks) and without it."""

import socket
import subprocess

import pytest

from test_mpi import MPIEXEC, TINY, clean_env, crystal, run, steps

pytestmark = pytest.mark.cuda

CUDA_TINY = [*(a if a != "cpu" else "cuda" for a in TINY), "--spheres", "2", "--steps", "12"]


def gpus() -> int:
    from crystal.world import gpu_count

    return gpu_count()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda-single") / "run"
    run(crystal(*CUDA_TINY, "--out", str(out)))
    return out


def same_run(a, b) -> bool:
    return (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes() and steps(a) == steps(b)


SHARDING = ["--shard-optimizer", "--no-shard-optimizer"]


@pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec")
@pytest.mark.parametrize("shard", SHARDING)
def test_two_ranks_sharing_a_gpu_exchange_through_the_host_bitwise(single, tmp_path, shard):
    out = tmp_path / "run"
    env = {**clean_env(), "CUDA_VISIBLE_DEVICES": "0"}  # both ranks on one GPU: MPI via host memory
    done = subprocess.run([MPIEXEC, "-n", "2", *crystal(*CUDA_TINY, shard, "--out", str(out))],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert same_run(out, single)


@pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec")
@pytest.mark.parametrize("shard", SHARDING)
def test_nccl_ranks_under_mpiexec_match_one_process_bitwise(single, tmp_path, shard):
    if gpus() < 2:
        pytest.skip("needs 2 GPUs")
    from crystal.world import nccl_available

    assert nccl_available(), "cupy has no NCCL library (pip install nvidia-nccl-cu13)"
    out = tmp_path / "run"
    run([MPIEXEC, "-n", "2", *crystal(*CUDA_TINY, shard, "--out", str(out))], 600)
    assert same_run(out, single)


def test_nccl_ranks_from_torchrun_variables_match_one_process_bitwise(single, tmp_path):
    if gpus() < 2:
        pytest.skip("needs 2 GPUs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    procs = []
    for rank in (0, 1):
        env = {**clean_env(), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(crystal(*CUDA_TINY, "--out", str(out)), env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    assert same_run(out, single)
