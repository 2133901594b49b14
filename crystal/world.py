"""Ranks: which process of a multi-process run this is, and how the processes talk.

`discover()` reads the launcher's environment (mpiexec/mpirun, srun, torchrun-style
variables). A process with none of them is a world of one and imports no MPI. `connect()`
returns the transport for the run's device:

- cpu: MPI through mpi4py, host buffers (one collective call per step on a flat buffer);
- cuda: NCCL through `cupyx.distributed` when every rank has its own GPU, otherwise MPI with
  the buffer staged through host memory.

Every collective runs under a watchdog: if the other ranks do not answer within the timeout
(a rank died, hangs, or was never started), this rank prints one line and exits with
EXIT_RANK_FAILURE, so no rank waits forever. Launchers end the other ranks themselves when
one exits early (mpiexec, srun); the watchdog covers the rest.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from crystal.errors import CrystalError

EXIT_RANK_FAILURE = 4
DEFAULT_TIMEOUT_S = 60.0
STARTUP_TIMEOUT_S = 600.0  # the first meeting waits for every rank's imports, data and kernels

# (rank, size, local rank) variables of each launcher, in the order they are tried
LAUNCHERS = (
    ("mpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),  # Open MPI
    ("mpi", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),  # MPICH / Intel MPI (hydra)
    ("mpi", "PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK"),  # PMIx launchers
    ("slurm", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"),  # srun (a step, not sbatch)
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launcher: str = "single"
    master_addr: str | None = None  # torchrun-style rendezvous (NCCL), when given
    master_port: int | None = None

    @property
    def is_root(self) -> bool:
        return self.rank == 0


def _int(env: Mapping[str, str], name: str) -> int:
    raw = env[name]
    try:
        return int(raw)
    except ValueError:
        raise CrystalError(f"launcher variable {name}={raw!r} is not an integer") from None


def discover(env: Mapping[str, str] | None = None) -> World:
    """This process's place in the run, from the first launcher whose variables are set."""
    env = os.environ if env is None else env
    for launcher, rank_var, size_var, local_var in LAUNCHERS:
        if rank_var in env and size_var in env:
            rank, size = _int(env, rank_var), _int(env, size_var)
            local = _int(env, local_var) if local_var in env else 0
            if size < 1 or not 0 <= rank < size or local < 0:
                raise CrystalError(f"launcher variables {rank_var}={rank}, {size_var}={size}: "
                                   "need 0 <= rank < size")
            port = env.get("MASTER_PORT")
            if port is not None and not port.isdigit():
                raise CrystalError(f"MASTER_PORT={port!r} is not a port number")
            return World(rank, size, local, launcher, env.get("MASTER_ADDR"),
                         int(port) if port else None)
    return World()


def rank_ranges(n: int, ranks: int) -> list[range]:
    """The contiguous share of n items (micro-batches, eval batches) of each rank."""
    return [range(r * n // ranks, (r + 1) * n // ranks) for r in range(ranks)]


# --- the watchdog ----------------------------------------------------------------------------

class Watchdog:
    """Ends the process when a collective outlives its deadline (a daemon thread, armed per call)."""

    def __init__(self, rank: int):
        self.rank = rank
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._what = ""
        self._timeout = 0.0
        threading.Thread(target=self._run, name="crystal-watchdog", daemon=True).start()

    def arm(self, what: str, timeout: float) -> None:
        with self._cond:
            self._deadline, self._what, self._timeout = time.monotonic() + timeout, what, timeout
            self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._deadline = None

    def _run(self) -> None:
        with self._cond:
            while True:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                sys.stderr.write(f"error: rank {self.rank}: no answer from the other ranks for "
                                 f"{self._timeout:g} s during {self._what}; a rank failed or hangs\n")
                sys.stderr.flush()
                os._exit(EXIT_RANK_FAILURE)


# --- transports ------------------------------------------------------------------------------

class Comm:
    """A world of one: every collective is the identity."""

    def __init__(self, world: World = World(), timeout: float = DEFAULT_TIMEOUT_S):
        self.world, self.timeout = world, timeout
        self.rank, self.size = world.rank, world.size
        self.seconds = 0.0  # time inside collectives (communication and waiting for peers)
        self.calls = 0
        self.bytes_sent = 0  # payload this rank delivered to the other ranks (not what a ring forwards)
        self._watchdog = Watchdog(world.rank) if world.size > 1 else None

    def _collective(self, what: str, fn, timeout: float | None = None, sent: int = 0):
        t0 = time.perf_counter()
        self.bytes_sent += sent
        if self._watchdog is not None:
            self._watchdog.arm(what, timeout or self.timeout)
        try:
            return fn()
        finally:
            if self._watchdog is not None:
                self._watchdog.disarm()
            self.seconds += time.perf_counter() - t0
            self.calls += 1

    # what the trainer calls
    def allgather_rows(self, buf) -> None:
        """buf[R * k, n]: rank r's rows k*r ... k*r+k-1 are filled; afterwards all are, everywhere."""
        sent = buf.nbytes // self.size * (self.size - 1)
        self._collective("the gradient exchange", lambda: self._gather_rows(buf), sent=sent)

    def allgather_values(self, values, what: str = "the exchange of losses",
                         timeout: float | None = None) -> np.ndarray:
        """float64 values[k] of every rank -> [R, k], in rank order."""
        v = np.ascontiguousarray(values, dtype=np.float64).reshape(-1)
        return self._collective(what, lambda: self._gather_values(v), timeout, v.nbytes * (self.size - 1))

    # the sharded optimizer's exchanges, on flat float32 buffers (host or device): counts and
    # displacements in elements, indexed by rank, the same lists on every rank
    def alltoallv(self, send, send_counts, send_displs, recv, recv_counts, recv_displs, block: int) -> None:
        """send[send_displs[o]:+send_counts[o]] goes to rank o, which receives it at
        recv[recv_displs[r]:+recv_counts[r]] for this rank r (MPI_Alltoallv). block: the largest
        count of any rank to any rank (transports that pad every block to one size)."""
        sent = sum(c for o, c in enumerate(send_counts) if o != self.rank) * send.itemsize
        self._collective("the gradient exchange", lambda: self._alltoallv(
            send, send_counts, send_displs, recv, recv_counts, recv_displs, block), sent=sent)

    def allgatherv(self, buf, counts, displs, what: str = "the parameter all-gather") -> None:
        """buf[displs[r]:+counts[r]] of every rank r into everyone's buf, in place (MPI_Allgatherv)."""
        sent = counts[self.rank] * buf.itemsize * (self.size - 1)
        self._collective(what, lambda: self._allgatherv(buf, counts, displs), sent=sent)

    def gatherv(self, part, counts, displs):
        """Every rank's part (counts[r] elements) joined at displs[r] of one buffer on rank 0
        (MPI_Gatherv); None on the other ranks."""
        sent = 0 if self.rank == 0 else counts[self.rank] * part.itemsize
        return self._collective("the gather of the optimizer state", lambda: self._gatherv(part, counts, displs),
                                sent=sent)

    def meet(self, fingerprint: int) -> None:
        """The first meeting of all ranks: fails when their configs or parameters differ."""
        fps = self.allgather_values(np.array([float(fingerprint)]), "the first meeting", STARTUP_TIMEOUT_S)
        if np.any(fps != fps[0]):
            raise CrystalError("ranks disagree on the run (config, data or initial parameters differ: "
                               f"fingerprints {[int(f) for f in fps[:, 0]]})")

    def share(self, n: int) -> range:
        """This rank's items of n (its range of the step's micro-batches, of the eval batches)."""
        return rank_ranges(n, self.size)[self.rank]

    def gather(self, local: list[float], n: int, what: str = "the exchange of losses") -> list[float]:
        """Per-item values (losses, chunks' sums of squares) of every rank's share of n items,
        in item order."""
        if self.size == 1:
            return list(local)
        ranges = rank_ranges(n, self.size)
        padded = np.full(max(len(r) for r in ranges), np.nan)
        padded[:len(local)] = local
        rows = self.allgather_values(padded, what)
        return [float(v) for r, rg in enumerate(ranges) for v in rows[r, :len(rg)]]

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on some rank."""
        return bool(np.any(self.allgather_values(np.array([1.0 if flag else 0.0]), "the stop decision")))

    # what a transport implements
    def _gather_rows(self, buf) -> None:
        pass

    def _gather_values(self, v: np.ndarray) -> np.ndarray:
        return v.reshape(1, -1)

    def _alltoallv(self, send, send_counts, send_displs, recv, recv_counts, recv_displs, block) -> None:
        s, r, n = send_displs[0], recv_displs[0], send_counts[0]
        recv[r:r + n] = send[s:s + n]

    def _allgatherv(self, buf, counts, displs) -> None:
        pass

    def _gatherv(self, part, counts, displs):
        return part


class MpiComm(Comm):
    """mpi4py on host buffers; cupy buffers are staged through host memory."""

    def __init__(self, world: World, timeout: float = DEFAULT_TIMEOUT_S):
        try:
            from mpi4py import MPI
        except ImportError as e:
            raise CrystalError(f"{world.size} ranks need mpi4py and an MPI library "
                               f"(pip install 'crystal[mpi]'): {e}") from None
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        if (self.comm.Get_rank(), self.comm.Get_size()) != (world.rank, world.size):
            raise CrystalError(
                f"the {world.launcher} variables say rank {world.rank} of {world.size}, MPI says "
                f"{self.comm.Get_rank()} of {self.comm.Get_size()}: on the cpu, launch with mpiexec "
                "or srun --mpi=pmi2 (torchrun-style variables alone start no MPI)")
        super().__init__(world, timeout)

    def _gather_rows(self, buf) -> None:
        if isinstance(buf, np.ndarray):
            self.comm.Allgather(self.MPI.IN_PLACE, buf)
        else:  # a cupy array without NCCL: through the host
            host = buf.get()
            self.comm.Allgather(self.MPI.IN_PLACE, host)
            buf.set(host)

    def _gather_values(self, v: np.ndarray) -> np.ndarray:
        out = np.empty((self.size, v.size), dtype=np.float64)
        self.comm.Allgather(v, out)
        return out

    def _alltoallv(self, send, send_counts, send_displs, recv, recv_counts, recv_displs, block) -> None:
        host = isinstance(recv, np.ndarray)
        s = send if host else send.get()
        r = recv if host else np.empty(recv.shape, recv.dtype)
        self.comm.Alltoallv([s, (send_counts, send_displs)], [r, (recv_counts, recv_displs)])
        if not host:
            recv.set(r)

    def _allgatherv(self, buf, counts, displs) -> None:
        host = isinstance(buf, np.ndarray)
        b = buf if host else buf.get()
        self.comm.Allgatherv(self.MPI.IN_PLACE, [b, (counts, displs)])
        if not host:
            buf.set(b)

    def _gatherv(self, part, counts, displs):
        p = part if isinstance(part, np.ndarray) else part.get()
        out = np.empty(sum(counts), p.dtype) if self.rank == 0 else None
        self.comm.Gatherv(p, [out, (counts, displs)] if out is not None else None, root=0)
        return out


class NcclComm(Comm):
    """NCCL through cupyx.distributed on device buffers, one GPU per rank."""

    def __init__(self, world: World, timeout: float = DEFAULT_TIMEOUT_S, use_mpi: bool = False):
        import cupy
        import cupyx.distributed

        super().__init__(world, timeout)
        self.cp = cupy
        where = {}  # torchrun-style MASTER_ADDR/PORT, else cupyx's defaults (or MPI, use_mpi)
        if world.master_addr:
            where["host"] = world.master_addr
        if world.master_port:
            where["port"] = world.master_port
        self.nccl = self._collective("the NCCL rendezvous", lambda: cupyx.distributed.init_process_group(
            world.size, world.rank, backend="nccl", use_mpi=use_mpi, **where), STARTUP_TIMEOUT_S)

    def _gather_rows(self, buf) -> None:
        k = buf.size // self.size
        mine = buf.reshape(-1)[self.rank * k:(self.rank + 1) * k]  # in place: NCCL allows it
        self.nccl.all_gather(mine, buf.reshape(-1), k)
        self.cp.cuda.get_current_stream().synchronize()

    def _gather_values(self, v: np.ndarray) -> np.ndarray:
        dv = self.cp.asarray(v)
        out = self.cp.empty(self.size * v.size, dtype=self.cp.float64)
        self.nccl.all_gather(dv, out, v.size)
        return self.cp.asnumpy(out).reshape(self.size, -1)

    # NCCL's all_to_all, all_gather and gather move equal blocks: each block is padded to the
    # largest one in a [R, block] staging buffer
    def _alltoallv(self, send, send_counts, send_displs, recv, recv_counts, recv_displs, block) -> None:
        cp, R = self.cp, self.size
        out_stage, in_stage = cp.empty((R, block), send.dtype), cp.empty((R, block), send.dtype)
        for o in range(R):
            out_stage[o, :send_counts[o]] = send[send_displs[o]:send_displs[o] + send_counts[o]]
        self.nccl.all_to_all(out_stage, in_stage)
        for r in range(R):
            recv[recv_displs[r]:recv_displs[r] + recv_counts[r]] = in_stage[r, :recv_counts[r]]
        cp.cuda.get_current_stream().synchronize()

    def _allgatherv(self, buf, counts, displs) -> None:
        cp, R, width = self.cp, self.size, max(counts)
        stage = cp.empty((R, width), buf.dtype)
        mine, at = counts[self.rank], displs[self.rank]
        stage[self.rank, :mine] = buf[at:at + mine]
        self.nccl.all_gather(stage[self.rank], stage.reshape(-1), width)
        for r in range(R):
            if r != self.rank:
                buf[displs[r]:displs[r] + counts[r]] = stage[r, :counts[r]]
        cp.cuda.get_current_stream().synchronize()

    def _gatherv(self, part, counts, displs):
        cp, R, width = self.cp, self.size, max(counts)
        mine = cp.zeros(width, part.dtype)
        mine[:part.size] = part
        stage = cp.empty((R, width) if self.rank == 0 else (R, 1), part.dtype)
        self.nccl.gather(mine, stage, 0)
        cp.cuda.get_current_stream().synchronize()
        if self.rank != 0:
            return None
        out = cp.empty(sum(counts), part.dtype)
        for r in range(R):
            out[displs[r]:displs[r] + counts[r]] = stage[r, :counts[r]]
        return out


def connect(world: World, device: str, timeout: float = DEFAULT_TIMEOUT_S) -> Comm:
    """The transport for this world and device (a world of one needs none).

    cuda: NCCL when every rank has a GPU of its own (LOCAL_RANK < GPUs on the node) and cupy
    has NCCL; otherwise ranks share GPUs round-robin and exchange through host memory by MPI.
    torchrun-style variables without an MPI launcher can only use NCCL."""
    if timeout <= 0 or not np.isfinite(timeout):
        raise CrystalError(f"--comm-timeout must be a positive number of seconds, got {timeout}")
    if world.size == 1:
        return Comm(world, timeout)
    own_gpu = device == "cuda" and world.local_rank < gpu_count() and nccl_available()
    if world.launcher == "torchrun" and device == "cuda":
        if not own_gpu:
            raise CrystalError(f"rank {world.rank}: torchrun-style launches on cuda need NCCL and one GPU "
                               f"per rank (LOCAL_RANK {world.local_rank}, {gpu_count()} GPUs)")
        return NcclComm(world, timeout)
    mpi = MpiComm(world, timeout)
    every_own_gpu = mpi.allgather_values(np.array([float(own_gpu)]), "the choice of transport", STARTUP_TIMEOUT_S)
    if device == "cuda" and bool(np.all(every_own_gpu)):
        return NcclComm(world, timeout, use_mpi=world.master_addr is None)
    return mpi


def gpu_count() -> int:
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


def nccl_available() -> bool:
    """cupy with its NCCL library loaded (cupy warns, and sets available False, without one)."""
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from cupy.cuda import nccl
        return bool(nccl.available)
    except Exception:
        return False
