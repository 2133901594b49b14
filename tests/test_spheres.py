"""The sphere ring: determinism across sphere counts, work spread, threads, failures."""

import threading
import time

import numpy as np
import pytest

from crystal.backends.cpu import CpuBackend
from crystal.config import resolve
from crystal.errors import SphereFailure
from crystal.model import ParamLayout, init_params
from crystal.trainer import train


def tiny(**overrides):
    return resolve("tiny", train_overrides=overrides)


@pytest.fixture(scope="module")
def runs_by_sphere_count():
    return {s: train(*tiny(spheres=s, steps=5)) for s in (1, 3, 12)}


@pytest.mark.parametrize("spheres", [3, 12])
def test_losses_are_bitwise_identical_for_any_sphere_count(runs_by_sphere_count, spheres):
    assert runs_by_sphere_count[spheres].losses == runs_by_sphere_count[1].losses


@pytest.mark.parametrize("spheres", [3, 12])
def test_final_parameters_are_bitwise_identical_for_any_sphere_count(runs_by_sphere_count, spheres):
    a, b = runs_by_sphere_count[1].params, runs_by_sphere_count[spheres].params
    assert a.tobytes() == b.tobytes()


def test_more_spheres_than_micro_batches_still_match(runs_by_sphere_count):
    r = train(*tiny(spheres=20, steps=5))
    assert r.params.tobytes() == runs_by_sphere_count[1].params.tobytes()
    assert r.root["active_spheres"] == 12


def test_twelve_sphere_threads_and_the_root_run_during_training():
    seen = []

    def on_step(rec, spheres):
        names = [t.name for t in threading.enumerate() if t.name.startswith("sphere-")]
        seen.append((sorted(names), threading.current_thread() is threading.main_thread()))

    train(*tiny(spheres=12, steps=3), on_step=on_step)
    for names, on_root in seen:
        assert names == sorted(f"sphere-{i}" for i in range(12))
        assert len(names) + 1 == 13 and on_root  # 12 spheres + the root
    assert not [t for t in threading.enumerate() if t.name.startswith("sphere-")]  # all joined


def test_micro_batches_are_spread_evenly_over_twelve_spheres():
    steps, M = 4, 24
    r = train(*tiny(spheres=12, steps=steps, micro_batches=M))
    assert [s["batches"] for s in r.spheres] == [steps * M // 12] * 12
    assert all(s["tokens"] == steps * M // 12 * 2 * 32 for s in r.spheres)
    assert all(0 < s["utilization"] <= 1 for s in r.spheres)
    assert all(np.isfinite(s["avg_loss"]) for s in r.spheres)
    assert r.root["active_spheres"] == 12


def test_fifty_tiny_steps_lower_the_loss_and_change_every_parameter():
    model_cfg, cfg = tiny(spheres=12, steps=50)
    r = train(model_cfg, cfg)
    assert np.mean(r.losses[-5:]) < np.mean(r.losses[:5]) - 1.0
    layout = ParamLayout(model_cfg)
    before, after = layout.views(init_params(model_cfg, cfg.seed)), layout.views(r.params)
    unchanged = [n for n in before if np.array_equal(before[n], after[n])]
    assert unchanged == []


class FailingBackend(CpuBackend):
    """Raises inside the attention forward of one sphere's thread."""

    def __init__(self, sphere: int):
        super().__init__()
        self.sphere = sphere

    def attention_forward(self, out, att, qkv, n_head, drop=None):
        if threading.current_thread().name == f"sphere-{self.sphere}":
            raise ValueError("injected failure")
        super().attention_forward(out, att, qkv, n_head, drop)


def test_an_exception_in_one_sphere_stops_the_run_with_that_error():
    t0 = time.perf_counter()
    with pytest.raises(SphereFailure, match="sphere 7 failed: ValueError: injected failure") as e:
        train(*tiny(spheres=12, steps=5), backend=FailingBackend(7))
    assert time.perf_counter() - t0 < 30
    assert isinstance(e.value.error, ValueError)
    assert not [t for t in threading.enumerate() if t.name.startswith("sphere-")]
