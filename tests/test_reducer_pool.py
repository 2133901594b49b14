"""The reducer's gradient pool: never more than spheres + ceil(log2 M) + 1 buffers, no deadlock
under any completion order, and results bitwise the old one-slot-per-micro-batch tree."""

import random
import threading
import time

import numpy as np
import pytest

from crystal import reducer
from crystal.backends.cpu import CpuBackend
from crystal.reducer import GradientReducer, ReducerAborted, chunk_bounds, norm_of, pool_rows, tree_pairs
from test_ranks import ThreadComm

be = CpuBackend()
SIZE = 1000


@pytest.fixture(autouse=True)
def no_safety_net(monkeypatch):
    """A waiting acquire re-checks every _WAIT_S seconds: longer than a run's join here, so a
    missed wake-up shows as a stuck sphere instead of a slow one."""
    monkeypatch.setattr(reducer, "_WAIT_S", 30.0)


def ceil_log2(n: int) -> int:
    return (n - 1).bit_length()


def reference(vals: np.ndarray) -> tuple[np.ndarray, float]:
    """The old reducer: one slot per micro-batch, the tree's pairs then x 1/M on every chunk
    (the backend's reduce_slots), the chunks' sums of squares added in chunk order."""
    slots = vals.copy()
    pairs = np.array(tree_pairs(len(vals)), dtype=np.int64).reshape(-1, 2)
    inv_m = 1.0 / len(vals)
    partial = [be.reduce_slots(slots, pairs, s, e, inv_m) if s < e else 0.0 for s, e in chunk_bounds(SIZE)]
    # the same gradient in plain numpy: float32 additions in tree order, the scale in float64
    plain = vals.copy()
    for d, s in tree_pairs(len(vals)):
        plain[d] += plain[s]
    assert (plain[0].astype(np.float64) * inv_m).astype(np.float32).tobytes() == slots[0].tobytes()
    return slots[0], norm_of(partial)


def gradients(m: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((m, SIZE)) * rng.uniform(0.01, 100, (m, 1))).astype(np.float32)


def run_spheres(red: GradientReducer, vals: np.ndarray, spheres: int, delay, steps: int = 2):
    """Spheres as threads, SphereSystem's round-robin (sphere s: local micro-batches s, s+N, ...),
    each writing its gradient after delay(j) seconds; returns the (grad, norm) of every step."""
    lo, n = red.owned.start, red.local_count
    out = []
    for _ in range(steps):
        red.begin_step()
        errors = []

        def sphere(s):
            try:
                for j in range(s, n, spheres):
                    time.sleep(delay(j))  # the forward
                    r = red.acquire(j)
                    time.sleep(delay(j) / 2)  # the backward
                    red.row(r)[...] = vals[lo + j]
                    red.release(j)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=sphere, args=(s,), daemon=True) for s in range(spheres)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert not any(t.is_alive() for t in threads), "a sphere is stuck waiting for a buffer"
        assert not errors, errors
        norm = red.reduce()
        out.append((red.grad.copy(), norm))
    return out


def schedules(seed: int):
    rng = random.Random(seed)
    return {
        "even": lambda j: 0.0,
        "random": lambda j: rng.uniform(0, 0.001),
        "first-slow": lambda j: 0.01 if j == 0 else 0.0,  # everyone else runs ahead of leaf 0
        "reversed": lambda j: 0.0005 * (20 - j) if j < 20 else 0.0,  # later ones finish first
    }


@pytest.mark.parametrize("m", [1, 2, 3, 8, 12, 13])
@pytest.mark.parametrize("spheres", [1, 2, 3, 5])
def test_the_pool_never_exceeds_its_bound_and_sums_bitwise_like_the_old_tree(m, spheres):
    vals = gradients(m, m * 10 + spheres)
    grad, norm = reference(vals)
    bound = spheres + ceil_log2(m) + 1
    for name, delay in schedules(m * 7 + spheres).items():
        red = GradientReducer(be, SIZE, m, spheres=spheres)
        assert red.rows == min(m, bound) == pool_rows(m, spheres)
        for g, n in run_spheres(red, vals, spheres, delay):
            assert g.tobytes() == grad.tobytes(), name
            assert n == norm, name
        assert red.high_water <= min(m, bound), name


@pytest.mark.parametrize("m, spheres", [(13, 5), (12, 3), (16, 4), (8, 8)])
def test_the_smallest_pool_cannot_deadlock_under_any_completion_order(m, spheres):
    """ceil(log2 M) + 1 rows, far fewer than the spheres want: they wait, never forever."""
    vals = gradients(m, m)
    grad, norm = reference(vals)
    waits = 0
    for name, delay in schedules(m).items():
        red = GradientReducer(be, SIZE, m, spheres=spheres, rows=ceil_log2(m) + 1)
        for g, n in run_spheres(red, vals, spheres, delay, steps=1):
            assert g.tobytes() == grad.tobytes() and n == norm, name
        assert red.high_water <= ceil_log2(m) + 1
        waits += red.waits
    assert waits > 0  # the flow control was exercised


def test_a_pool_too_small_to_be_safe_is_refused():
    with pytest.raises(ValueError, match="deadlock"):
        GradientReducer(be, SIZE, 12, rows=4)


def test_a_waiting_sphere_is_woken_by_an_abort():
    red = GradientReducer(be, SIZE, 4, rows=3)
    red.acquire(0), red.acquire(1), red.acquire(2)  # nothing released: the pool is full
    caught = []
    t = threading.Thread(target=lambda: caught.append(pytest.raises(ReducerAborted, red.acquire, 3)))
    t.start()
    time.sleep(0.05)
    assert t.is_alive()
    red.abort()
    t.join(5)
    assert not t.is_alive() and caught


@pytest.mark.parametrize("m, r, spheres", [(12, 2, 2), (13, 3, 3), (12, 5, 1), (16, 4, 3), (7, 7, 2)])
def test_ranks_pools_stay_bounded_and_reduce_bitwise_like_one_process(m, r, spheres):
    vals = gradients(m, m + r)
    grad, norm = reference(vals)
    shared = {"barrier": threading.Barrier(r)}
    out, reducers = [None] * r, [None] * r

    def rank(i):
        red = reducers[i] = GradientReducer(be, SIZE, m, ThreadComm(i, r, shared), spheres=spheres)
        out[i] = run_spheres(red, vals, spheres, schedules(i)["random"])

    threads = [threading.Thread(target=rank, args=(i,)) for i in range(r)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for red, steps in zip(reducers, out):
        n = red.local_count
        assert red.high_water <= min(n, spheres + ceil_log2(n) + 1)
        for g, nrm in steps:
            assert g.tobytes() == grad.tobytes() and nrm == norm


def test_memory_estimate_counts_the_pool_not_one_buffer_per_micro_batch():
    from crystal.config import resolve
    from crystal.memory import memory_estimate

    model, cfg = resolve("tiny")
    est = memory_estimate(model, 12, 2, cfg.batch_size, cfg.seq_len)
    assert est["grads"] == (2 + 4 + 1) * est["params"]  # 2 spheres + ceil(log2 12) + 1, not 12
    assert memory_estimate(model, 3, 12, cfg.batch_size, cfg.seq_len)["grads"] == 3 * est["params"]
