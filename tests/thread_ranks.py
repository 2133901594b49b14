"""Ranks as threads of one process, for tests: a Comm whose collectives meet at a barrier, and a
stand-in for cupyx.distributed's NCCLBackend on numpy arrays (the calls crystal makes)."""

import threading
import types

import numpy as np

from crystal.world import Comm, World


def meet(shared: dict, key, rank: int, size: int, value) -> list:
    """Every thread-rank's value for key, in rank order, once all `size` have given theirs."""
    board, barrier = shared.setdefault(key, {}), shared["barrier"]
    board[rank] = value
    barrier.wait()
    out = [board[r] for r in range(size)]
    barrier.wait()
    return out


def run_ranks(ranks: int, body, shared: dict | None = None) -> list:
    """[body(0), ..., body(ranks - 1)], each on its own thread sharing `shared` (made with the
    barrier the collectives meet at); the first exception is raised after every thread ended
    (the barrier aborted, so no rank waits for it)."""
    shared = {"barrier": threading.Barrier(ranks)} if shared is None else shared
    out, errors = [None] * ranks, []

    def rank(i):
        try:
            out[i] = body(i)
        except BaseException as e:  # noqa: BLE001 - raised below
            errors.append(e)
            shared["barrier"].abort()

    threads = [threading.Thread(target=rank, args=(i,)) for i in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


class ThreadComm(Comm):
    """R ranks as threads of one process: the collectives meet at a barrier (MPI's semantics)."""

    def __init__(self, rank: int, size: int, shared: dict):
        super().__init__(World(rank, 1), 5.0)  # a world of one for the base: no watchdog
        self.rank, self.size, self.shared = rank, size, shared

    def _exchange(self, key, value):
        return meet(self.shared, key, self.rank, self.size, value)

    def _gather_rows(self, buf) -> None:
        k = buf.shape[0] // self.size
        rows = self._exchange("rows", buf[self.rank * k:(self.rank + 1) * k].copy())
        for r, x in enumerate(rows):
            buf[r * k:(r + 1) * k] = x

    def _gather_values(self, v):
        return np.stack(self._exchange("values", v))

    def _alltoallv(self, send, send_counts, send_displs, recv, recv_counts, recv_displs, block) -> None:
        blocks = [send[d:d + c].copy() for c, d in zip(send_counts, send_displs)]
        every = self._exchange("alltoallv", blocks)
        for r in range(self.size):
            got = every[r][self.rank]
            assert got.size == recv_counts[r], "a rank sends another count than its peer expects"
            recv[recv_displs[r]:recv_displs[r] + recv_counts[r]] = got

    def _allgatherv(self, buf, counts, displs) -> None:
        at, n = displs[self.rank], counts[self.rank]
        for r, part in enumerate(self._exchange("allgatherv", buf[at:at + n].copy())):
            buf[displs[r]:displs[r] + counts[r]] = part

    def _gatherv(self, part, counts, displs):
        parts = self._exchange("gatherv", np.array(part, copy=True))
        if self.rank != 0:
            return None
        out = np.empty(sum(counts), part.dtype)
        for r, p in enumerate(parts):
            out[displs[r]:displs[r] + counts[r]] = p
        return out


class FakeNcclBackend:
    """cupyx.distributed's NCCLBackend as threads on numpy arrays: all_gather, all_to_all and
    gather, with NCCL's rule that every block has one size."""

    def __init__(self, n_devices, rank, shared):
        self.n, self.rank, self.shared = n_devices, rank, shared
        self.calls: list[str] = []

    def _meet(self, key, value):
        return meet(self.shared, key, self.rank, self.n, value)

    def all_gather(self, in_array, out_array, count, stream=None):
        self.calls.append("all_gather")
        assert in_array.size == count and out_array.size == count * self.n
        every = self._meet(("all_gather", count), in_array.copy())  # in_array may be out_array's own slice
        for r in range(self.n):
            out_array[r * count:(r + 1) * count] = every[r]

    def all_to_all(self, in_array, out_array, stream=None):
        self.calls.append("all_to_all")
        assert in_array.shape[0] == self.n and out_array.shape[0] == self.n
        every = self._meet("all_to_all", in_array.copy())
        for r in range(self.n):
            assert every[r][self.rank].size == out_array[r].size
            out_array[r] = every[r][self.rank]

    def gather(self, in_array, out_array, root=0, stream=None):
        self.calls.append("gather")
        assert out_array.shape[0] == self.n
        every = self._meet("gather", in_array.copy())
        if self.rank == root:
            for r in range(self.n):
                assert every[r].size == out_array[r].size
                out_array[r] = every[r]


def fake_cupy_modules(calls, ranks: int):
    """cupy and cupyx.distributed stand-ins for `ranks` thread-ranks; init calls go to calls."""
    shared = {"barrier": threading.Barrier(ranks)}
    cupy = types.ModuleType("cupy")
    cupy.asarray, cupy.asnumpy, cupy.float64 = np.asarray, np.asarray, np.float64
    cupy.empty, cupy.zeros = np.empty, np.zeros
    cupy.cuda = types.SimpleNamespace(get_current_stream=lambda: types.SimpleNamespace(synchronize=lambda: None))
    dist = types.ModuleType("cupyx.distributed")

    def init_process_group(n_devices, rank, *, backend="nccl", host=None, port=None, use_mpi=False):
        calls.append(dict(n_devices=n_devices, rank=rank, backend=backend, host=host, port=port,
                          use_mpi=use_mpi))
        return FakeNcclBackend(n_devices, rank, shared)

    dist.init_process_group = init_process_group
    cupyx = types.ModuleType("cupyx")
    cupyx.distributed = dist
    return {"cupy": cupy, "cupyx": cupyx, "cupyx.distributed": dist}
