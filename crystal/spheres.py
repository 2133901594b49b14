"""SphereSystem: a root (the calling thread) and a ring of N worker spheres.

The spheres are threads created once per run and kept for every step. Each owns its
activation buffers (allocated once, before the first step) and, on cuda, its stream. The root
hands out work by index, round-robin (sphere s takes items s, s+N, ...):

- micro-batches: sphere s runs forward/backward of micro-batch m, the backward writing into a
  row of the reducer's gradient pool (`reducer.acquire(m)`, which may wait while the pool is
  short); `reducer.release(m)` then runs, on this sphere, the tree additions that became ready.
  Which sphere computed what, or added what, never changes the result;
- chunks of the flat parameter buffer: the reducer's tree sum and the optimizer update run on
  fixed chunks (their count does not depend on N), so the spheres share that work too and the
  root only combines per-chunk partial sums, in chunk order.

The core gate (cpu; `--cores N`, by default the usable cores): at most `cores` spheres compute at
once (`CoreGate`). A sphere takes a core token for the forward/backward of each of its batches and
gives it back after it and the tree additions it completes; the token carries one of `cores`
activation buffer sets and (one process) runs on one cpu, so buffers stay hot in that core's cache
and memory does not grow with the sphere count. A micro-batch takes its gradient row
after its token when the pool has one at once, and otherwise gives the token back while it waits
for the row, so no sphere ever waits for a row while holding a core (the pool's no-deadlock
argument, crystal/reducer.py, needs every sphere with a row to progress). The flat
buffer's chunks (reducer, optimizer) are short items: they go to `cores` spheres, ungated.
Spheres stay threads that own their micro-batches, so the ring, the statistics and the bits are
unchanged; 12 spheres on 2 cores no longer oversubscribe them. Time spent waiting for a token is
`wait_s`, not `busy_s`.

The root waits for the last sphere of each round (one wake-up a round); an exception in any
sphere stops the round at once: the others finish the item they are on (or stop waiting for a
token), the root raises `SphereFailure`, and `close()` joins every thread.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from crystal.config import ModelConfig
from crystal.dropout import Dropout
from crystal.errors import SphereFailure
from crystal.model import Activations, ParamLayout, Tensors, backward, forward

JOIN_TIMEOUT_S = 10.0
_GATE_POLL_S = 0.2  # a sphere waiting for a core re-checks for a stop at least this often


def usable_cpus() -> list[int]:
    """The cpus this process may run on (its CPU affinity), else all of the machine's."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def usable_cores() -> int:
    return len(usable_cpus())


def gate_cores(cores: int | None) -> int | None:
    """The core gate's tokens for --cores: None (the default) the usable cores, 0 no gate."""
    if cores is None:
        return usable_cores()
    return cores or None


def computing_at_once(spheres: int, cores: int | None, device: str = "cpu") -> int:
    """How many of a run's spheres compute at once: each holds activations and, in flight, a
    gradient row (--cores as for gate_cores; on cuda, where there is no gate, all of them)."""
    gate = gate_cores(cores) if device != "cuda" else None
    return spheres if gate is None else min(spheres, gate)


class GateClosed(RuntimeError):
    """A sphere waiting for a core was woken because the run stops."""


class CoreGate:
    """`cores` tokens (0 .. cores-1): at most that many spheres compute at once. take(i, order)
    by sphere i's own thread returns the token it holds until give(i); a freed token goes straight
    to the waiting sphere with the smallest `order` (its micro-batch index), so micro-batches run
    roughly in order, as with one sphere per core, and the tree's additions follow them promptly.
    waiting[i]: sphere i waits for a core now; wait_s[i]: its seconds of waiting so far.

    admit(firsts, start): the root opens a round: the free tokens go to the spheres whose first
    items come first, and every other sphere queues without being woken: `start(i)` hands it its
    work together with a token (one wake-up instead of two, and no wake-up storm at the start of
    every step on cores that are computing).

    cpus: token t runs on cpus[t]: the sphere holding it is pinned there (the giver pins the
    sphere it wakes before waking it, so it wakes on the core just freed). Without pinning the
    scheduler often wakes a sphere on the core still busy with another one, and the token's
    activations go cold in the other core's L2 (bench/RESULTS.md: the gate). None: no pinning."""

    def __init__(self, cores: int, spheres: int, stop: threading.Event, cpus: list[int] | None = None):
        self.cores = cores
        self._lock = threading.Lock()
        self._free = list(range(cores - 1, -1, -1))
        self._queue: list[tuple[int, int]] = []  # (order, sphere) waiting, a heap
        self._handed: list[int | None] = [None] * spheres
        self._wake = [threading.Event() for _ in range(spheres)]
        self._stop = stop
        self._token: list[int | None] = [None] * spheres
        self._cpus = cpus if cpus is not None and len(cpus) >= cores else None
        self._tid: list[int | None] = [None] * spheres  # each sphere's OS thread id
        self._on: list[int | None] = [None] * spheres  # the cpu sphere i is pinned to
        self._start: Callable[[int], None] | None = None
        self._deferred: dict[int, float] = {}  # sphere -> when it queued, not started yet
        self.waiting = [False] * spheres
        self.wait_s = [0.0] * spheres

    def admit(self, firsts: list[tuple[int, int]], start: Callable[[int], None]) -> None:
        """(order, sphere) of each sphere's first item this round; start(i) gives it its work."""
        now, started = time.perf_counter(), []
        with self._lock:
            self._start = start
            for order, i in sorted(firsts):
                if self._free and not self._queue:
                    self._handed[i] = self._free.pop()
                    self._pin(i, self._handed[i])  # before it wakes: on the token's cpu
                    started.append(i)
                else:
                    heapq.heappush(self._queue, (order, i))
                    self._deferred[i] = now
                    self.waiting[i] = True
        for i in started:
            start(i)

    def take(self, i: int, order: int = 0) -> int:
        with self._lock:
            if self._handed[i] is not None:  # handed with its work (admit)
                token, self._handed[i] = self._handed[i], None
                self._token[i] = token
                self._pin(i, token)
                return token
            if self._free and not self._queue:
                self._token[i] = token = self._free.pop()
                self._pin(i, token)
                return token
            self._wake[i].clear()
            heapq.heappush(self._queue, (order, i))
        t0 = time.perf_counter()
        self.waiting[i] = True
        try:
            while not self._wake[i].wait(_GATE_POLL_S):
                if self._stop.is_set():
                    with self._lock:
                        if self._handed[i] is None:  # never handed a token: leave the queue
                            self._queue.remove((order, i))
                            heapq.heapify(self._queue)
                            raise GateClosed("the run stops")
                    break  # handed one just now: take it, the caller stops after the item
        finally:
            self.waiting[i] = False
            self.wait_s[i] += time.perf_counter() - t0
        with self._lock:
            token, self._handed[i] = self._handed[i], None
        self._token[i] = token
        return token

    def held(self, i: int) -> int:
        """The token sphere i holds."""
        return self._token[i]

    def give(self, i: int) -> None:
        token, self._token[i] = self._token[i], None
        if token is None:
            return
        with self._lock:
            if self._queue:
                _, j = heapq.heappop(self._queue)
                self._handed[j] = token
                self._pin(j, token)
                if j in self._deferred:  # admitted, not started: its work and the token at once
                    self.wait_s[j] += time.perf_counter() - self._deferred.pop(j)
                    self.waiting[j] = False
                    self._start(j)
                else:
                    self._wake[j].set()
            else:
                self._free.append(token)

    def register(self, i: int) -> None:
        """Sphere i's thread, as it starts: its OS thread id, so others can pin it."""
        self._tid[i] = threading.get_native_id()

    def pin(self, i: int, token: int) -> None:
        """Sphere i onto token's cpu before it is woken for work outside the gate (the chunks)."""
        with self._lock:
            self._pin(i, token)

    def _pin(self, i: int, token: int) -> None:  # under the lock
        if self._cpus is None or self._tid[i] is None or self._on[i] == self._cpus[token]:
            return
        try:
            os.sched_setaffinity(self._tid[i], {self._cpus[token]})
            self._on[i] = self._cpus[token]
        except OSError:  # not allowed here (a container's cpuset changed): run unpinned
            self._cpus = None


@dataclass
class SphereStats:
    """What one sphere has done so far (written by its thread, read by the root)."""

    index: int
    batches: int = 0
    loss_sum: float = 0.0
    busy_s: float = 0.0  # all work: micro-batches, reducer and optimizer chunks, evaluation
    wait_s: float = 0.0  # waiting for a core (the core gate)
    tokens: int = 0
    active: bool = False  # inside a micro-batch right now

    @property
    def avg_loss(self) -> float:
        return self.loss_sum / self.batches if self.batches else float("nan")

    def summary(self, wall_s: float) -> dict:
        return {
            "sphere": self.index,
            "batches": self.batches,
            "avg_loss": self.avg_loss if self.batches else None,
            "busy_s": round(self.busy_s, 4),
            "wait_s": round(self.wait_s, 4),
            "utilization": self.busy_s / wall_s if wall_s > 0 else 0.0,
            "tokens": self.tokens,
            "tokens_per_s": self.tokens / wall_s if wall_s > 0 else 0.0,
        }


@dataclass
class _Round:
    """One map(): its items' results and the spheres still at work. The last sphere to finish
    wakes the root (one wake-up a round, not one per sphere); a failing one wakes it at once."""

    ready: object  # the root's event: everything the items read is in place
    work: Callable[[int, int], float]  # work(sphere, item) -> result
    results: list  # results[item], written by the sphere that runs the item
    left: int  # spheres still at work
    done: list  # each finished sphere's event (cuda: its stream's last work)


class SphereSystem:
    def __init__(self, be, cfg: ModelConfig, layout: ParamLayout, params, reducer,
                 n_spheres: int, batch_size: int, seq_len: int, cores: int | None = None,
                 pin: bool = False, lora=None):
        """cores: at most this many spheres compute at once (the core gate); None: no gate.
        pin: every computing sphere runs on one cpu of this process's: sphere i on cpu i when
        there are cpus enough, else the gate's token t on cpu t (one process per machine: ranks
        sharing a machine would pin onto the same cpus).
        lora: (LoraConfig, AdapterLayout, adapters) (crystal.lora): params is the frozen base and
        the gradient rows are the adapters'."""
        self.be, self.cfg = be, cfg
        self.n = n_spheres
        # what forward/backward read: params, or their bf16 copy (AdamW refreshes it as it updates)
        self.weights = Tensors(layout, be.compute_weights(params), be)
        self.reducer = reducer
        self.lora, lora_layout = (lora[0], lora[1]) if lora is not None else (None, None)
        self.lora_layout = lora_layout
        if lora is None:
            self.row_grads = [Tensors(layout, reducer.row(r)) for r in range(reducer.rows)]  # the pool's rows
            self.trainable = self.weights.flat  # the buffer AdamW refreshes as it updates
        else:
            self.adapter_weights = lora_layout.tensors(be.compute_weights(lora[2]))
            self.row_grads = [lora_layout.tensors(reducer.row(r)) for r in range(reducer.rows)]
            self.trainable = self.adapter_weights.flat
        self.stats = [SphereStats(i) for i in range(n_spheres)]
        self.wall_s = 0.0  # root time spent in rounds, the denominator of utilization
        self.counts_launches = hasattr(be, "thread_launches")  # cuda: kernel and library launches
        self.launches_per_micro_batch: int | None = None
        self._inbox: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(n_spheres)]  # (round, items)
        self._done: queue.SimpleQueue = queue.SimpleQueue()  # (sphere, error or None), one a round
        self._count = threading.Lock()
        self._stop = threading.Event()
        cpus = usable_cpus() if pin else None
        self.gate = (CoreGate(cores, n_spheres, self._stop, cpus)
                     if cores is not None and cores < n_spheres else None)
        self._own_cpu = cpus if self.gate is None and cpus and n_spheres <= len(cpus) else None
        self.concurrent = n_spheres if self.gate is None else self.gate.cores  # spheres computing at once
        # one activation buffer set per sphere, or per core token under the gate
        self._acts = [Activations(be, cfg, batch_size, seq_len, lora_layout) for _ in range(self.concurrent)]
        self._threads = [
            threading.Thread(target=self._sphere_loop, args=(i,), name=f"sphere-{i}", daemon=True)
            for i in range(n_spheres)
        ]
        for t in self._threads:
            t.start()

    # --- the worker side ---
    def _sphere_loop(self, i: int) -> None:
        be = self.be
        if self._own_cpu:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, {self._own_cpu[i]})
        if self.gate is not None:
            self.gate.register(i)
        with be.sphere_context(i):
            while True:
                task = self._inbox[i].get()
                if task is None:
                    return
                rnd, items = task
                gate, stats = self.gate, self.stats[i]
                waited0 = gate.wait_s[i] if gate else 0.0
                t0 = time.perf_counter()
                err, done = None, None
                try:
                    be.wait_event(rnd.ready)
                    for item in items:
                        if self._stop.is_set():
                            break
                        rnd.results[item] = rnd.work(i, item)
                    done = be.record_event()
                except GateClosed:  # another sphere failed while this one waited for a core
                    pass
                except BaseException as e:  # reported to the root, which re-raises it
                    stats.active, err = False, e
                waited = (gate.wait_s[i] - waited0) if gate else 0.0
                stats.wait_s = gate.wait_s[i] if gate else 0.0  # admitted rounds wait before they start
                stats.busy_s += time.perf_counter() - t0 - waited
                if err is not None:
                    self._done.put((i, err))
                    continue
                with self._count:
                    rnd.done.append(done)
                    rnd.left -= 1
                    last = rnd.left == 0
                if last:
                    self._done.put((i, None))

    def _row_and_core(self, i: int, m: int) -> int:
        """Under the gate: a core token, then micro-batch m's gradient row if the pool has one now;
        otherwise the core goes back while the sphere waits for the row (a sphere never waits for
        a row while it holds a core), and is taken again. Rows are taken by computing spheres
        only, so few are in use and they stay in cache."""
        self.gate.take(i, m)
        row = self.reducer.acquire(m, block=False)
        if row is None:
            self.gate.give(i)
            row = self.reducer.acquire(m)
            self.gate.take(i, m)
        return row

    @contextlib.contextmanager
    def _core(self, i: int, order: int = 0, held: bool = False):
        """Sphere i computes inside: with a core token and its activation buffers (the gate; the
        smallest order waiting gets a freed core first; held: taken already), or with its own buffers."""
        if self.gate is None:
            yield self._acts[i]
            return
        token = self.gate.held(i) if held else self.gate.take(i, order)
        try:
            yield self._acts[token]
        finally:
            self.gate.give(i)

    def _lora_pass(self, acts, drop: Dropout | None = None):
        """The adapters' part of one batch (None without LoRA); drop: its LoRA dropout."""
        if self.lora is None:
            return None
        from crystal.lora import LoraPass

        return LoraPass(self.lora, self.adapter_weights, acts.lora, drop)

    def _train_micro_batch(self, i: int, x, y, m: int, drop: Dropout | None,
                           lora_drop: Dropout | None = None, denom: float | None = None) -> float:
        be, stats = self.be, self.stats[i]
        stats.active = True
        gated = self.gate is not None
        if gated:
            row = self._row_and_core(i, m)
        with self._core(i, m, held=gated) as acts:
            lp = self._lora_pass(acts, lora_drop)
            keys = (drop.keys(self.cfg.n_layer) if drop else []) + (lp.keys(self.cfg.n_layer) if lp else [])
            x, y = be.stage([(x, y)], self.cfg.vocab_size, [keys] if keys else None)[0]
            issued = be.thread_launches() if self.counts_launches else 0
            loss = forward(be, self.cfg, self.weights, acts, x, y, drop, grad=True, lora=lp, denom=denom)
            if not gated:
                row = self.reducer.acquire(m)
            if lp is not None:  # the frozen base gets no gradient; the adapters' go to the row
                lp.g = self.row_grads[row]
            backward(be, self.cfg, self.weights, None if lp else self.row_grads[row], acts, x, y, drop, lora=lp)
            if self.counts_launches:  # the same for every micro-batch of a run
                self.launches_per_micro_batch = be.thread_launches() - issued
            stats.active = False
            self.reducer.release(m)  # the tree additions it completes, on this sphere and its core
        stats.batches += 1
        stats.loss_sum += loss
        stats.tokens += x.size
        return loss

    def _eval_batch(self, i: int, x, y, k: int, denom: float | None) -> float:
        be = self.be
        with self._core(i, k) as acts:
            return forward(be, self.cfg, self.weights, acts, be.to_device(x), be.to_device(y),
                           lora=self._lora_pass(acts), denom=denom)

    # --- the root side ---
    def step(self, batches: list, drops: list[Dropout] | None = None,
             lora_drops: list[Dropout] | None = None, denom: float | None = None) -> list[float]:
        """Forward/backward of every micro-batch (with drops[m], its dropout, and lora_drops[m],
        its adapters' dropout, when given); gradients are summed in the reducer's pool. Returns the
        per-micro-batch losses, in order. denom: each micro-batch's loss sum is divided by it
        (crystal.model.loss_denominator of the whole step's micro-batches; default B*T)."""
        if len(batches) != self.reducer.local_count:
            raise ValueError(f"{len(batches)} micro-batches for the reducer's {self.reducer.local_count}")
        self.reducer.begin_step()
        return self.map(len(batches), lambda i, m: self._train_micro_batch(
            i, *batches[m], m, drops[m] if drops else None, lora_drops[m] if lora_drops else None, denom),
            gated=True)

    def evaluate(self, batches: list, denom: float | None = None) -> list[float]:
        """Forward-only losses of any number of batches, spread over the spheres likewise
        (denom: as step's)."""
        return self.map(len(batches), lambda i, m: self._eval_batch(i, *batches[m], m, denom), gated=True)

    def scorer(self) -> Callable:
        """token_losses(idx, targets) -> [B, T] float32 cross-entropy of each prediction, forward
        only, computed on the calling (root) thread between rounds with the weights the spheres
        train (and their adapters under LoRA), in activations of its own: those of the last
        shape only (a task's batches differ in length; the logits of 32 rows of GPT-2 are ~1 GB),
        freed with the function. No sphere's buffer, no RNG, nothing the training reads is
        touched. What crystal.tasks.score calls during training (--eval-task)."""
        acts: dict[tuple[int, int], Activations] = {}  # one shape at most

        def token_losses(idx, targets) -> np.ndarray:
            be = self.be
            idx, targets = np.ascontiguousarray(idx, dtype=np.int32), np.ascontiguousarray(targets, dtype=np.int32)
            if min(idx.min(), targets.min()) < 0 or max(idx.max(), targets.max()) >= self.cfg.vocab_size:
                raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size})")
            if idx.shape not in acts:
                acts.clear()  # the last shape's buffers go first (cuda: back to the pool)
                acts[idx.shape] = Activations(be, self.cfg, *idx.shape, self.lora_layout)
            a = acts[idx.shape]
            forward(be, self.cfg, self.weights, a, be.to_device(idx), be.to_device(targets), lora=self._lora_pass(a))
            return np.array(be.to_host(a.losses), dtype=np.float32).reshape(idx.shape)

        return token_losses

    def map(self, n_items: int, work: Callable[[int, int], float], gated: bool = False) -> list:
        """[work(sphere, item) for item in range(n_items)], items spread round-robin: over every
        sphere (gated: batches, which take a core token inside), or over as many spheres as may
        compute at once (the flat buffer's chunks: short items, where a token hand-off would cost
        more than the work)."""
        if self._stop.is_set():
            raise RuntimeError("the sphere system has stopped")
        t0 = time.perf_counter()
        spread = self.n if gated else self.concurrent
        shares = [list(range(s, n_items, spread)) for s in range(min(spread, n_items))]
        rnd = _Round(self.be.record_event(), work, [float("nan")] * n_items, len(shares), [])
        if gated and self.gate is not None:
            self.gate.admit([(items[0], s) for s, items in enumerate(shares)],
                            lambda s: self._inbox[s].put((rnd, shares[s])))
        else:
            for s, items in enumerate(shares):
                if self.gate is not None:  # the chunks: sphere s < cores on cpu s, pinned before it wakes
                    self.gate.pin(s, s)
                self._inbox[s].put((rnd, items))
        if shares:
            i, err = self._done.get()
            if err is not None:
                self._stop.set()
                self.reducer.abort()  # spheres waiting for a gradient row give up
                raise SphereFailure(i, err) from err
            for done in rnd.done:
                self.be.wait_event(done)  # the root reads results only after the spheres' work
        self.wall_s += time.perf_counter() - t0
        return rnd.results

    def summary(self) -> list[dict]:
        return [s.summary(self.wall_s) for s in self.stats]

    def active_spheres(self) -> int:
        return sum(1 for s in self.stats if s.batches > 0)

    def close(self) -> None:
        self._stop.set()
        self.reducer.abort()
        for q in self._inbox:
            q.put(None)
        for t in self._threads:
            t.join(JOIN_TIMEOUT_S)

    def __enter__(self) -> "SphereSystem":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
