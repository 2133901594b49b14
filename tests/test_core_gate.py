"""The core gate (cpu): at most min(spheres, cores) spheres compute at once, and the bits, the
ring and the per-sphere statistics stay what they are without it."""

import os
import threading
import time

import pytest

from crystal.backends.cpu import CpuBackend, blas_threads_agree, product_shapes
from crystal.config import resolve
from crystal.errors import SphereFailure
from crystal.spheres import CoreGate, GateClosed, gate_cores, usable_cpus
from crystal.trainer import train


def run(spheres: int, cores: int | None, steps: int = 3, backend=None, **over):
    model, cfg = resolve("tiny", train_overrides=dict(spheres=spheres, cores=cores, steps=steps, device="cpu",
                                                      dropout=0.1, **over))
    return train(model, cfg, backend=backend)


@pytest.fixture(scope="module")
def reference():
    out = run(1, 1)  # one core: one sphere, one BLAS thread
    assert out.root["blas_threads"] == 1
    return out


@pytest.mark.parametrize("spheres, cores", [(1, 1), (1, 2), (3, 1), (3, 2), (12, 1), (12, 2), (20, 2), (20, 1),
                                            (12, None), (12, 0)])
def test_the_gate_changes_no_bit(reference, spheres, cores):
    out = run(spheres, cores)
    assert out.params.tobytes() == reference.params.tobytes() and out.losses == reference.losses
    assert out.root["concurrent_spheres"] == min(spheres, gate_cores(cores) or spheres)
    assert [s["batches"] for s in out.spheres] == [len(range(i, 12, spheres)) * 3 for i in range(spheres)]


def test_one_sphere_on_two_cores_gives_blas_the_spare_core_where_the_bits_allow(reference):
    if len(usable_cpus()) < 2:
        pytest.skip("one usable cpu")
    out = run(1, 2)
    model, cfg = resolve("tiny")
    agree = blas_threads_agree(2, product_shapes(model.n_embd, model.vocab_size, cfg.batch_size * cfg.seq_len))
    assert out.root["blas_threads"] == (2 if agree else 1)
    assert out.params.tobytes() == reference.params.tobytes() and out.losses == reference.losses


def test_blas_keeps_one_thread_where_the_bits_would_change(monkeypatch):
    import crystal.backends.cpu as cpu

    monkeypatch.setattr(cpu, "blas_threads_agree", lambda n, shapes: False)
    assert run(1, 2, steps=1).root["blas_threads"] == 1


def test_spheres_as_many_as_cores_keep_one_blas_thread():
    assert run(2, 2, steps=1).root["blas_threads"] == 1


class CountingBackend(CpuBackend):
    """Records the most spheres inside a matmul at once."""

    def __init__(self):
        super().__init__()
        self.inside, self.most, self._lock = 0, 0, threading.Lock()

    def matmul_forward(self, *a, **k):
        with self._lock:
            self.inside += 1
            self.most = max(self.most, self.inside)
        try:
            time.sleep(0.001)  # long enough for others to pile in, were they allowed
            return super().matmul_forward(*a, **k)
        finally:
            with self._lock:
                self.inside -= 1


@pytest.mark.parametrize("cores", [1, 2])
def test_at_most_cores_spheres_compute_at_once(cores):
    be = CountingBackend()
    out = run(12, cores, steps=2, backend=be)
    assert be.most <= cores
    assert sum(s["wait_s"] for s in out.spheres) > 0  # somebody waited for a core


@pytest.mark.parametrize("cores", [0, 64])
def test_without_a_gate_spheres_do_overlap(cores):
    be = CountingBackend()
    run(12, cores, steps=2, backend=be)
    assert be.most > 2


class AffinityBackend(CpuBackend):
    """Records the cpus each sphere's matmul may run on (the root's warm-up aside)."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def matmul_forward(self, *a, **k):
        if threading.current_thread().name.startswith("sphere-"):
            self.seen.add(frozenset(os.sched_getaffinity(0)))
        return super().matmul_forward(*a, **k)


@pytest.mark.parametrize("spheres, cores", [(12, 1), (12, 2), (2, 2)])
def test_a_computing_sphere_is_pinned_to_one_cpu(spheres, cores):
    """Gated: token t's holder on cpu t; with cpus enough (2 spheres, 2 cores): sphere i on cpu i."""
    cpus = usable_cpus()
    if len(cpus) < cores:
        pytest.skip(f"{len(cpus)} usable cpus")
    be = AffinityBackend()
    run(spheres, cores, steps=2, backend=be)
    assert be.seen and all(len(s) == 1 and s <= set(cpus[:cores]) for s in be.seen)
    assert os.sched_getaffinity(0) == set(cpus)  # the root (the caller's thread) is never pinned


class FailingInSphere(CpuBackend):
    def __init__(self, sphere_name: str):
        super().__init__()
        self.sphere_name = sphere_name

    def matmul_forward(self, *a, **k):
        if threading.current_thread().name == self.sphere_name:
            raise RuntimeError("injected failure")
        time.sleep(0.002)
        return super().matmul_forward(*a, **k)


def test_a_sphere_that_raises_while_others_wait_for_a_core_ends_the_run_within_seconds():
    t0 = time.perf_counter()
    with pytest.raises(SphereFailure, match="sphere 5 failed: RuntimeError: injected failure"):
        run(12, 1, steps=50, backend=FailingInSphere("sphere-5"))
    assert time.perf_counter() - t0 < 5


def test_a_closed_gate_wakes_its_waiters():
    stop = threading.Event()
    gate = CoreGate(1, 2, stop)
    gate.take(0)
    errors = []

    def waiter():
        try:
            gate.take(1)
        except GateClosed as e:
            errors.append(e)

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.3)
    assert gate.waiting[1]
    stop.set()
    t.join(2)
    assert not t.is_alive() and errors and gate.wait_s[1] > 0.2


def test_dry_run_and_info_say_how_many_spheres_compute_at_once(capsys):
    from crystal.cli import main

    assert main(["train", "--preset", "tiny", "--device", "cpu", "--cores", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "spheres: 12, at most 2 computing at once on the cpu (--cores 2)" in out
    assert "per sphere x 2 computing at once" in out  # activations per token, not per sphere
    from crystal.info import describe

    assert "spheres compute at once" in describe()["cores"]
    assert main(["train", "--preset", "tiny", "--device", "cpu", "--cores", "0", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "spheres: 12, all computing at once on the cpu" in out and "per sphere x 12 =" in out
    assert main(["train", "--preset", "tiny", "--device", "cpu", "--dry-run"]) == 0  # the default: usable cores
    n = len(usable_cpus())
    assert (f"spheres: 12, at most {n} computing at once on the cpu ({n} usable cores" if n < 12 else
            "spheres: 12, all computing at once") in capsys.readouterr().out


@pytest.mark.parametrize("cores", ["-1", "x", "5000", "1.5"])
def test_nonsense_cores_exit_2(cores, tmp_path):
    from crystal.cli import main

    assert main(["train", "--preset", "tiny", "--cores", cores, "--out", str(tmp_path / "r"), "--quiet"]) == 2


def test_the_ring_tells_waiting_for_a_core_from_idle():
    from crystal.dashboard import WAITING, activity

    assert activity(0.0)[0] == "idle"
    assert activity(0.1, waiting=0.8) == WAITING
    assert activity(0.8, waiting=0.1)[0] == "very active"
